"""The ASGI test application of :mod:`_gunicorn_app` as an object, for daphne (which calls no factory)."""

from _gunicorn_app import make_asgi_app

application = make_asgi_app()
