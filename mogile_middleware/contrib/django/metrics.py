"""A Django view with the Prometheus metrics: ``path("metrics", metrics.view)`` in ``urls.py``.

Start counting in ``wsgi.py`` or ``asgi.py`` with :func:`mogile_middleware.prometheus.record`,
and keep the URL away from the public (a proxy rule, ``@staff_member_required``, an internal
host). Needs the ``prometheus`` extra.
"""

from __future__ import annotations

from django.http import HttpRequest, HttpResponse
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from ...prometheus import registry


def view(request: HttpRequest) -> HttpResponse:
    """Every worker's metrics in Prometheus' text format."""
    return HttpResponse(generate_latest(registry()), content_type=CONTENT_TYPE_LATEST)
