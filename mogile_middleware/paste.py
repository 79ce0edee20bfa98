"""PasteDeploy filter factory: ``use = egg:mogile_middleware`` in a ``[filter:...]`` section.

The options are the keyword arguments of :class:`MogileFSMiddleware` (``memcached_servers``,
``memcached_secret`` and ``memcached_prefix`` give ``cache_backend``), given as strings in the
ini file and converted here, so that a mistake fails when the application is loaded.
"""

from __future__ import annotations

import functools
import inspect
import pkgutil
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any

try:
    from paste.deploy.converters import asbool, asint, aslist
except ModuleNotFoundError as error:  # the optional extra
    raise ModuleNotFoundError(f"mogile_middleware.paste needs PasteDeploy: "
                              f"pip install 'mogile_middleware[paste]' ({error})", name=error.name) from error

from .middleware import REPROXY_MODES, MogileFSMiddleware, WSGIApp, parse_trusted_proxies
from .tracker import parse_trackers

if TYPE_CHECKING:
    from .memcache import MemcachedBackend

REQUIRED = ("domain", "trackers")


def _items(value: str) -> list[str]:
    """The items of a list option, separated by commas, spaces or lines."""
    return value.replace(",", " ").split()


def _trackers(value: str) -> list[str]:
    """``host:port`` addresses, one per line or separated by spaces or commas, checked here to fail early."""
    addresses = _items(value)
    if addresses:  # none: "is required" below
        parse_trackers(addresses)
    return addresses


def _reproxy(value: str) -> str | None:
    """``none``, ``perlbal`` or ``nginx``: the middleware's ``reproxy`` mode."""
    name = value.strip().lower()
    mode = None if name == "none" else name
    if mode not in REPROXY_MODES:
        raise ValueError(f"{value!r} is not one of none, perlbal, nginx")
    return mode


def _networks(value: str) -> list[str]:
    """Addresses or networks (or ``unix``) separated by commas, spaces or lines, as ``trackers``
    are, checked here to fail early."""
    networks = _items(value)
    parse_trusted_proxies(networks)
    return networks


def _callable(value: str) -> Callable[..., Any]:
    """A ``module:name`` (or ``module.name``) reference to a function, imported at load time."""
    try:
        found = pkgutil.resolve_name(value.strip())
    except (ImportError, AttributeError) as error:
        raise ValueError(f"cannot import {value!r}: {error}") from error
    if not callable(found):  # a bad value in the ini: PasteDeploy users expect ValueError, not TypeError
        raise ValueError(f"{value!r} is not callable")  # noqa: TRY004
    return found


def _memcached(servers: list[str] | None, secret: list[str] | None, prefix: str | None) -> MemcachedBackend | None:
    """A shared path cache in memcached on ``host:port`` ``servers``; none: the in-process cache.
    A ValueError names the option at fault."""
    if not servers:
        for name, value, does in [("memcached_secret", secret, "signs the entries"),
                                  ("memcached_prefix", prefix, "starts the keys")]:
            if value is not None:
                raise ValueError(f"mogile_middleware option {name} {does} of memcached_servers, which is not set")
        return None
    try:
        from .memcache import MemcachedBackend, checked_prefix  # pymemcache is an optional extra
    except ImportError as error:
        raise ValueError(f"mogile_middleware option memcached_servers: {error}") from error
    try:
        checked = {} if prefix is None else {"prefix": checked_prefix(prefix)}
    except ValueError as error:
        raise ValueError(f"mogile_middleware option memcached_prefix: {error}") from error
    try:
        return MemcachedBackend(servers, secret=secret, **checked)
    except ValueError as error:
        raise ValueError(f"mogile_middleware option memcached_servers: {error}") from error


def _memcached_prefix(value: str) -> str:
    """The start of the shared cache's memcached keys; left empty, a template's unfilled value."""
    prefix = value.strip()
    if not prefix:
        raise ValueError("no prefix given (leave the option out for the default, 'mogile:')")
    return prefix


def _text(value: str) -> str:
    """A text option without the line break before a value written on the next line, which the
    ini file keeps (``domain =`` then ``media`` below it was the domain "\nmedia")."""
    return value.strip()


def _secrets(value: str) -> list[str]:
    """Signing secrets, one per line: the first signs, each verifies. Spaces are a secret's own: a
    passphrase split at them would be several short secrets, each of which would do."""
    secrets = [line.strip() for line in value.splitlines() if line.strip()]
    if not secrets:
        raise ValueError("no secret given")
    return secrets


def _prefix(value: str) -> str:
    """The URL path under which keys are served; an empty value is refused rather than taken for ``/``."""
    if not value.strip():
        raise ValueError("give a URL path such as /mogilefs/ (/ for every path)")
    return value.strip()


def _none_or_text(value: str) -> str | None:
    """An option that may be None (``charset``, ``content_disposition``): empty or ``none``, as
    ``reproxy = none``; else the text."""
    name = value.strip()
    return None if name.lower() in ("", "none") else name


def _mimetypes(value: str) -> dict[str, str]:
    """``.ext=type`` pairs, one per line or separated by spaces (``.webp=image/webp``)."""
    pairs = [item.partition("=") for item in aslist(value)]
    if any(not sep for _, sep, _ in pairs):
        raise ValueError(f"expected .ext=type pairs, got {value!r}")
    return {ending: media_type for ending, _, media_type in pairs}


def _trusted_files(value: str) -> bool | list[str]:
    """``true`` or ``false``, or key prefixes separated by spaces or lines (``static/ assets/``)."""
    switch = value.strip().lower()
    if switch in ("y", "t", "n", "f"):  # asbool's letters, or a prefix: either reading trusts what the other does not
        raise ValueError(f"{value.strip()!r} is ambiguous: write true or false, or key prefixes such as static/")
    return bool(asbool(switch)) if switch in _SWITCH_WORDS else list(aslist(value))


#: The words of a switch that may also be a list of prefixes.
_SWITCH_WORDS = frozenset(("true", "yes", "on", "1", "false", "no", "off", "0"))


#: Converters of the options whose type alone does not say how to read them.
_SPECIAL: Mapping[str, Callable[[str], Any]] = {
    "trackers": _trackers,
    "reproxy": _reproxy,
    "trusted_proxies": _networks,
    "key_for_path": _callable,
    "authorize": _callable,
    "signing_key": _secrets,
    "mimetypes": _mimetypes,
    "prefix": _prefix,
    "charset": _none_or_text,
    "content_disposition": _none_or_text,
    "trusted_files": _trusted_files,
}

#: Converters by the middleware's annotation of an argument (``X | None`` reads as ``X``).
_BY_TYPE: Mapping[str, Callable[[str], Any]] = {"str": _text, "float": float, "int": asint, "bool": asbool}

#: The middleware's arguments that an ini file cannot give as such (``memcached_servers`` gives
#: ``cache_backend``), or that the WSGI middleware ignores (``client_timeout``: the server writes the body).
_NOT_OPTIONS = {"app", "client", "cache_backend", "client_timeout"}


def _options() -> dict[str, Callable[[str], Any]]:
    """Every option the filter takes, read from the middleware's signature, with its converter."""
    options: dict[str, Callable[[str], Any]] = {}
    for name, parameter in inspect.signature(MogileFSMiddleware).parameters.items():
        if name in _NOT_OPTIONS:
            continue
        options[name] = _SPECIAL.get(name) or _BY_TYPE[str(parameter.annotation).removesuffix(" | None")]
    return {**options, "memcached_servers": _servers, "memcached_secret": _secrets,
            "memcached_prefix": _memcached_prefix}


def _servers(value: str) -> list[str]:
    """``host:port`` items separated by commas, spaces or lines, as ``trackers`` are; ``none``: none."""
    return [] if value.strip().lower() == "none" else _items(value)


#: Every option the filter takes, with the converter from its ini string.
OPTIONS: Mapping[str, Callable[[str], Any]] = _options()

#: The options that together give the middleware's ``cache_backend``.
CACHE_BACKEND_OPTIONS = ("memcached_servers", "memcached_secret", "memcached_prefix")
#: Text options for which ``none``, as ``reproxy = none`` says it, could only mean no value, but
#: would be taken as the text: a ``Cache-Control: none`` instead of ``private``, a guessable secret.
_NONE_REFUSED = ("cache_control", "signing_key", "memcached_secret", "memcached_prefix")


def filter_factory(global_conf: Mapping[str, str], **local_conf: str) -> Callable[[WSGIApp], MogileFSMiddleware]:
    """Convert the ``[filter:...]`` options and return the filter wrapping the next application.

    Raises ``ValueError`` naming the option for an unknown, missing or malformed one. A global
    value named as an option (``[DEFAULT]``, gunicorn's ``--paste-global``, ``loadapp``'s
    ``global_conf``) is that option's, as a section's ``set name = value`` is: PasteDeploy drops
    the section's own value of a global's name and hands the global here instead. One it leaves
    (a ``get``, or a name the section both sets and gives) wins: it was written in the section.
    """
    local_conf = {**{name: value for name, value in global_conf.items() if name in OPTIONS}, **local_conf}
    unknown = sorted(set(local_conf) - set(OPTIONS))
    if unknown:
        raise ValueError(f"unknown mogile_middleware option(s) {', '.join(unknown)}; "
                         f"the options are: {', '.join(sorted(OPTIONS))}")
    options: dict[str, Any] = {}
    for name, value in local_conf.items():
        if name in _NONE_REFUSED and value.strip().lower() == "none":
            raise ValueError(f"mogile_middleware option {name}: 'none' is no value of it; leave the option out")
        try:
            options[name] = OPTIONS[name](value)
        except ValueError as error:
            raise ValueError(f"mogile_middleware option {name}: {error}") from error
    if any(name in options for name in CACHE_BACKEND_OPTIONS):
        options["cache_backend"] = _memcached(*(options.pop(name, None) for name in CACHE_BACKEND_OPTIONS))
    for name in REQUIRED:
        if not options.get(name):
            raise ValueError(f"mogile_middleware option {name} is required")
    return functools.partial(MogileFSMiddleware, **options)
