"""A Django view with the Prometheus metrics: ``path("metrics", metrics.view)`` in ``urls.py``.

Start counting in ``wsgi.py`` or ``asgi.py`` with :func:`mogile_middleware.prometheus.record`,
and keep the URL away from the public (a proxy rule, ``@staff_member_required``, an internal
host). Needs the ``prometheus`` extra.
"""

from __future__ import annotations

from django.http import HttpRequest, HttpResponse
from django.views.decorators.http import require_safe

from ...prometheus import exposition


@require_safe
def view(request: HttpRequest) -> HttpResponse:
    """Every worker's metrics in Prometheus' text format, those named by ``name[]`` if the scrape
    names some (as prometheus_client's own endpoints do); a 405 for a method other than GET and HEAD."""
    body, content_type = exposition(request.GET.getlist("name[]"))
    return HttpResponse(body, content_type=content_type)
