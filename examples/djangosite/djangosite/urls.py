"""URLs of the example site: the upload page. Files under /media/ never get here: the
middleware wrapped around the application in ``wsgi.py`` answers them."""

from django.urls import path
from gallery import views

urlpatterns = [
    path("", views.upload, name="upload"),
]
