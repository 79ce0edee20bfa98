"""A view that checks an API key, then has the middleware serve the file, under Django's
``cache_page``: the URL configuration of a test (``ROOT_URLCONF``). (A response to a request
with ``Authorization`` varies on it, as of Django 5.2; one to an ``X-Api-Key`` does not.)"""

from __future__ import annotations

from django.http import HttpRequest, HttpResponse, HttpResponseForbidden
from django.urls import path
from django.views.decorators.cache import cache_page

from mogile_middleware.contrib.django import serve

#: The API key that opens the files.
API_KEY = "open-sesame"


@cache_page(600)
def token_file(request: HttpRequest, name: str) -> HttpResponse:
    if request.headers.get("X-Api-Key") != API_KEY:
        return HttpResponseForbidden("no such key\n")
    return serve(request, name)


urlpatterns = [path("token/<path:name>", token_file)]
