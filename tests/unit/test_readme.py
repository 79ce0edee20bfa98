"""The README's configuration reference names every option the code takes, so the two cannot drift."""

from __future__ import annotations

import ast
import inspect
import re
from collections.abc import Callable
from pathlib import Path

import pytest
from conftest import require_module

import mogile_middleware
from mogile_middleware import AsyncClient, Client, asgi, middleware

PACKAGE = Path(mogile_middleware.__file__).parent
README = Path(__file__).resolve().parents[2] / "README.rst"


def reference() -> str:
    """The "Configuration reference" section of the README, up to the next section of its level."""
    text = README.read_text(encoding="utf-8")
    start = text.index("\nConfiguration reference\n=====")
    following = re.search(r"\n[^\n]+\n=+\n", text[start + 1:])
    return text[start:start + 1 + following.start()] if following else text[start:]


def keyword_arguments(cls: type) -> list[str]:
    return [name for name, parameter in inspect.signature(cls).parameters.items()
            if parameter.kind is inspect.Parameter.KEYWORD_ONLY]


def django_settings() -> list[str]:
    """The setting names ``contrib/django/conf.py`` reads: its upper-case string constants."""
    tree = ast.parse((PACKAGE / "contrib" / "django" / "conf.py").read_text(encoding="utf-8"))
    return sorted({node.value for node in ast.walk(tree) if isinstance(node, ast.Constant)
                   and isinstance(node.value, str) and re.fullmatch(r"[A-Z][A-Z0-9]*(_[A-Z0-9]+)+", node.value)})


def paste_options() -> list[str]:
    require_module("paste.deploy")
    from mogile_middleware import paste

    return list(paste.OPTIONS)


@pytest.mark.parametrize("names", [
    pytest.param(lambda: keyword_arguments(middleware.MogileFSMiddleware), id="wsgi-middleware"),
    pytest.param(lambda: keyword_arguments(asgi.MogileFSMiddleware), id="asgi-middleware"),
    pytest.param(lambda: keyword_arguments(Client), id="client"),
    pytest.param(lambda: keyword_arguments(AsyncClient), id="async-client"),
    pytest.param(paste_options, id="paste"),
    pytest.param(django_settings, id="django"),
])
def test_the_reference_names_every_option(names: Callable[[], list[str]]) -> None:
    found = names()
    assert found, "no option found: the test no longer reads the code"
    section = reference()
    # An ini key may appear as the start of an ini line (``trackers = ...``).
    end = "(``| = )" if names is paste_options else "``"
    assert [name for name in found if not re.search(f"``{re.escape(name)}{end}", section)] == []
