"""The MOGILEFS_* settings, read and checked each time they are needed.

Nothing is read at import, so ``override_settings`` works; a missing or wrong setting raises
``ImproperlyConfigured`` naming it.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, TypeVar
from urllib.parse import urlsplit

from django.conf import settings
from django.core.exceptions import ImproperlyConfigured

from ...deadline import checked_seconds
from ...middleware import REPROXY_MODES, MogileFSMiddleware, parse_trusted_proxies
from ...protocol import has_control_character
from ...tracker import Address, parse_trackers

if TYPE_CHECKING:
    from ...memcache import MemcachedBackend

T = TypeVar("T")

#: Middleware arguments that have a setting of their own, so MOGILEFS_MIDDLEWARE_OPTIONS may not set them.
_OWN_SETTINGS = {
    "client": "MOGILEFS_DOMAIN and MOGILEFS_TRACKERS",
    "domain": "MOGILEFS_DOMAIN",
    "trackers": "MOGILEFS_TRACKERS",
    "prefix": "MOGILEFS_MEDIA_URL",
    "reproxy": "MOGILEFS_REPROXY",
    "trusted_proxies": "MOGILEFS_TRUSTED_PROXIES",
    "cache_control": "MOGILEFS_CACHE_CONTROL",
    "path_cache_seconds": "MOGILEFS_PATH_CACHE_SECONDS",
    "nginx_location": "MOGILEFS_NGINX_LOCATION",
    "signing_key": "MOGILEFS_SIGNING_KEY",
    "connect_timeout": "MOGILEFS_CLIENT_OPTIONS",
    "io_timeout": "MOGILEFS_CLIENT_OPTIONS",
    "dead_seconds": "MOGILEFS_CLIENT_OPTIONS",
}
#: What MOGILEFS_CLIENT_OPTIONS may set: the timeouts of the clients of the storages and the middleware.
CLIENT_OPTIONS = ("connect_timeout", "io_timeout", "dead_seconds", "storage_timeout")
_MIDDLEWARE_ARGUMENTS = frozenset(inspect.signature(MogileFSMiddleware).parameters) - {"app"}


def validated(name: str, value: object, check: Callable[[Any], T]) -> T:
    """``check(value)``, with its complaint turned into ``ImproperlyConfigured`` naming ``name``."""
    try:
        return check(value)
    except (TypeError, ValueError) as error:
        raise ImproperlyConfigured(f"{name}: {error}") from None


def text(value: object) -> str:
    """A non-empty string without control characters (a domain, a class: one read from a file with
    its line break would be refused by the tracker at every request)."""
    if not isinstance(value, str) or not value or has_control_character(value):
        raise ValueError(f"expected a non-empty string without control characters, got {value!r}")
    return value


def flag(value: object) -> bool:
    """``True`` or ``False``, not merely truthy."""
    if not isinstance(value, bool):
        raise TypeError(f"expected True or False, got {value!r}")
    return value


def _host_ports(value: object) -> tuple[str, ...]:
    """``"host:port"`` strings from a list of them or one comma- or space-separated string."""
    if not isinstance(value, (str, list, tuple)) or not all(isinstance(item, str) for item in value):
        raise ValueError(f'expected a list of "host:port" strings or one string, got {value!r}')
    return tuple(value.replace(",", " ").split() if isinstance(value, str) else value)


def tracker_addresses(value: object) -> tuple[Address, ...]:
    """Tracker addresses from a list of ``"host:port"`` strings or one comma-separated string."""
    return tuple(parse_trackers(_host_ports(value)))


def folder_url(value: object) -> str:
    """A URL ending with ``/``: ``"/media/"``, ``"https://cdn.example/media/"``, or, as Django's
    ``MEDIA_URL`` may be, a path relative to the site's script prefix: ``"media/"``."""
    parts = urlsplit(value) if isinstance(value, str) else None
    if (parts is None or not value.endswith("/") or parts.query or parts.fragment  # type: ignore[union-attr]
            or not (parts.path.startswith("/") or not (parts.scheme or parts.netloc or value.startswith("/")))):
        raise ValueError(f'expected a URL path ending with "/" (e.g. "/media/" or "media/"), got {value!r}')
    return value  # type: ignore[return-value]


def script_relative(media_url: str) -> bool:
    """True for a media URL below the site's script prefix (``"media/"``), as Django reads a
    relative ``MEDIA_URL``: its links start with ``SCRIPT_NAME`` (or ``FORCE_SCRIPT_NAME``)."""
    return not urlsplit(media_url).path.startswith("/")


def _required(name: str) -> Any:
    if not hasattr(settings, name):
        raise ImproperlyConfigured(f"{name} is not set: the MogileFS storage and middleware need it")
    return getattr(settings, name)


def domain() -> str:
    """``MOGILEFS_DOMAIN``: the domain of every key."""
    return validated("MOGILEFS_DOMAIN", _required("MOGILEFS_DOMAIN"), text)


def trackers() -> tuple[Address, ...]:
    """``MOGILEFS_TRACKERS``: the trackers' addresses."""
    return validated("MOGILEFS_TRACKERS", _required("MOGILEFS_TRACKERS"), tracker_addresses)


def media_url() -> str:
    """``MOGILEFS_MEDIA_URL``: where the files are on the web, and the middleware's prefix."""
    return validated("MOGILEFS_MEDIA_URL", _required("MOGILEFS_MEDIA_URL"), folder_url)


def memcached_servers() -> tuple[str, ...]:
    """``MOGILEFS_MEMCACHED_SERVERS``: the memcached of a path cache shared by every process and
    host (a list or a comma-separated string); none when unset."""
    value = getattr(settings, "MOGILEFS_MEMCACHED_SERVERS", None)
    return () if value is None else validated("MOGILEFS_MEMCACHED_SERVERS", value, _host_ports)


def memcached_backend(servers: tuple[str, ...]) -> MemcachedBackend | None:
    """The shared path cache on ``servers`` (from :func:`memcached_servers`), signed with
    ``MOGILEFS_MEMCACHED_SECRET`` (or secrets, the first signing) when set, its keys starting
    with ``MOGILEFS_MEMCACHED_PREFIX`` when set, or None for none."""
    if not servers:
        for name, does in [("MOGILEFS_MEMCACHED_SECRET", "signs the entries"),
                           ("MOGILEFS_MEMCACHED_PREFIX", "starts the keys")]:
            if getattr(settings, name, None) is not None:
                raise ImproperlyConfigured(f"{name} {does} of MOGILEFS_MEMCACHED_SERVERS, which is not set")
        return None
    try:
        from ...memcache import MemcachedBackend, checked_prefix  # pymemcache is an optional extra
    except ImportError as error:
        raise ImproperlyConfigured(f"MOGILEFS_MEMCACHED_SERVERS: {error}") from error
    secret = getattr(settings, "MOGILEFS_MEMCACHED_SECRET", None)
    prefix = getattr(settings, "MOGILEFS_MEMCACHED_PREFIX", None)
    secrets = None if secret is None else validated("MOGILEFS_MEMCACHED_SECRET", secret, _secrets)
    checked = {} if prefix is None else {
        "prefix": validated("MOGILEFS_MEMCACHED_PREFIX", prefix, lambda value: checked_prefix(text(value)))}
    try:
        return MemcachedBackend(servers, secret=secrets, **checked)
    except ValueError as error:
        raise ImproperlyConfigured(f"MOGILEFS_MEMCACHED_SERVERS: {list(servers)!r}: {error}") from None


def _reproxy_mode(value: object) -> str | None:
    if value not in REPROXY_MODES:
        raise ValueError(f"expected one of {REPROXY_MODES}, got {value!r}")
    return value


def _networks(value: object) -> list[str]:
    # A lone string would be read as a list of one-character addresses.
    if not isinstance(value, (list, tuple)):
        raise TypeError(f"expected a list of addresses or networks, got {value!r}")
    parse_trusted_proxies(value)
    return list(value)


def _header_value(value: object) -> str:
    if not isinstance(value, str):
        raise TypeError(f"expected a string, got {value!r}")
    return value


def _seconds(value: object) -> float:
    return checked_seconds("it", value, zero=True)  # type: ignore[arg-type]


def _secrets(value: object) -> Any:
    if not isinstance(value, (str, bytes, list, tuple)) or not value or any(
            not isinstance(secret, (str, bytes)) or not secret.strip() for secret in
            ([value] if isinstance(value, (str, bytes)) else value)):
        raise ValueError(f"expected a non-empty string or bytes (blanks alone are empty), or a list of them, got "
                         f"{type(value).__name__}")
    return value


def signing_key() -> Any:
    """``MOGILEFS_SIGNING_KEY``: the secret (or secrets, the first signing) of signed URLs; none when unset."""
    value = getattr(settings, "MOGILEFS_SIGNING_KEY", None)
    return None if value is None else validated("MOGILEFS_SIGNING_KEY", value, _secrets)


def _positive_seconds(value: object) -> float:
    return checked_seconds("it", value)  # type: ignore[arg-type]


def url_expires() -> float:
    """``MOGILEFS_URL_EXPIRES``: how long a signed URL of ``MogileFSStorage.url`` opens its file (an hour)."""
    value = getattr(settings, "MOGILEFS_URL_EXPIRES", None)
    return validated("MOGILEFS_URL_EXPIRES", 3600 if value is None else value, _positive_seconds)


def _extra_options(value: object) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise TypeError(f"expected a dict of MogileFSMiddleware arguments, got {value!r}")
    for option in value:
        if option in _OWN_SETTINGS:
            raise ValueError(f"{option!r} has its own setting: use {_OWN_SETTINGS[option]}")
        if option not in _MIDDLEWARE_ARGUMENTS:
            raise ValueError(f"MogileFSMiddleware has no argument {option!r}")
    return value


#: Optional settings → (middleware argument, check); unset or ``None`` leaves the middleware's default.
_OPTIONAL: dict[str, tuple[str, Callable[[Any], Any]]] = {
    "MOGILEFS_TRUSTED_PROXIES": ("trusted_proxies", _networks),
    "MOGILEFS_CACHE_CONTROL": ("cache_control", _header_value),
    "MOGILEFS_PATH_CACHE_SECONDS": ("path_cache_seconds", _seconds),
    "MOGILEFS_NGINX_LOCATION": ("nginx_location", text),  # a path or a named location: the middleware checks
    "MOGILEFS_SIGNING_KEY": ("signing_key", _secrets),
}


def _client_options(value: object) -> dict[str, float]:
    if not isinstance(value, dict):
        raise TypeError(f"expected a dict of {', '.join(CLIENT_OPTIONS)}, got {value!r}")
    for option, seconds in value.items():
        if option not in CLIENT_OPTIONS:
            raise ValueError(f"{option!r} is not one of {', '.join(CLIENT_OPTIONS)}")
        try:  # a timeout of 0 would fail every request; a tracker may be skipped for 0 s
            _seconds(seconds) if option == "dead_seconds" else _positive_seconds(seconds)
        except ValueError as error:
            raise ValueError(f"{option}: {error}") from None
    return value


def client_options() -> dict[str, float]:
    """``MOGILEFS_CLIENT_OPTIONS``: the tracker and storage timeouts of every client (unset: their defaults)."""
    value = getattr(settings, "MOGILEFS_CLIENT_OPTIONS", None)
    return {} if value is None else validated("MOGILEFS_CLIENT_OPTIONS", value, _client_options)


def reproxy() -> str | None:
    """``MOGILEFS_REPROXY`` if set, else ``"perlbal"`` when the classic ``SERVE_WITH_PERLBAL`` is on."""
    if hasattr(settings, "MOGILEFS_REPROXY"):
        return validated("MOGILEFS_REPROXY", settings.MOGILEFS_REPROXY, _reproxy_mode)
    perlbal = getattr(settings, "SERVE_WITH_PERLBAL", None)  # None: as if unset; 0 and "" are refused
    return "perlbal" if perlbal is not None and validated("SERVE_WITH_PERLBAL", perlbal, flag) else None


def configured(make: Callable[[], T]) -> T:
    """``make()`` (the middleware, from the settings), its refusal of a value turned into
    ``ImproperlyConfigured`` naming the setting that gave it."""
    try:
        return make()
    except (TypeError, ValueError) as error:
        option = str(error).partition(" ")[0].rstrip(":")
        raise ImproperlyConfigured(f"{_OWN_SETTINGS.get(option, 'MOGILEFS_MIDDLEWARE_OPTIONS')}: {error}") from None


def middleware_options() -> dict[str, Any]:
    """The :class:`MogileFSMiddleware` arguments the settings give, besides the client."""
    given = getattr(settings, "MOGILEFS_MIDDLEWARE_OPTIONS", None)  # an empty list is no dict either
    options = {} if given is None else validated("MOGILEFS_MIDDLEWARE_OPTIONS", given, _extra_options)
    if "cache_backend" in options and memcached_servers():
        raise ImproperlyConfigured(
            "MOGILEFS_MIDDLEWARE_OPTIONS: 'cache_backend' and MOGILEFS_MEMCACHED_SERVERS both choose the path cache; "
            "set one of them"
        )
    path = urlsplit(media_url()).path
    if path == "/":
        raise ImproperlyConfigured(
            f"MOGILEFS_MEDIA_URL: {media_url()!r} puts the files at the root, where the middleware would answer "
            'every request and Django none: give them a path of their own (e.g. "https://media.example.com/files/")'
        )
    options = {**options, "prefix": "/" + path if script_relative(path) else path, "reproxy": reproxy()}
    if "storage_timeout" in client_options():  # serve mode reads storage nodes as the clients do
        options.setdefault("storage_timeout", client_options()["storage_timeout"])
    for name, (argument, check) in _OPTIONAL.items():
        value = getattr(settings, name, None)
        if value is not None:
            options[argument] = validated(name, value, check)
    url_expires()  # not the middleware's, but refused at start-up rather than by every url() of the site
    return options
