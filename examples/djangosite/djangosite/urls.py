"""URLs of the example site: the upload page, the private files and the login page. Files under
/media/ never get here: the middleware wrapped around the application in ``wsgi.py`` answers them."""

from django.contrib.auth import views as auth_views
from django.urls import path
from gallery import views

urlpatterns = [
    path("", views.upload, name="upload"),
    path("private/<path:name>", views.private_file, name="private_file"),
    path("accounts/login/", auth_views.LoginView.as_view(), name="login"),
]
