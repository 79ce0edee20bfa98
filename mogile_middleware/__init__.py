"""mogile_middleware: put files stored in MogileFS on the web from any WSGI or ASGI application.

The public names: :class:`MogileFSMiddleware` (the WSGI middleware: serve or reproxy files under
a URL prefix; the ASGI one is :class:`mogile_middleware.asgi.MogileFSMiddleware`),
:class:`Client` and :class:`AsyncClient` (Python 3 tracker clients with pymogile's method
names), :class:`Uploader` (writes keys with a class from any source), :func:`serve_header` (a
view's answer that the middleware replaces with a key's file), :class:`Admin`, :class:`FileInfo`,
the path cache backends and the exceptions. The embedded development MogileFS lives in
:mod:`mogile_middleware.devserver`.
"""

from .async_client import AsyncClient
from .cache import CacheBackend, MemoryCache
from .client import Admin, Client, FileInfo
from .exceptions import (
    BadKeyError,
    KeyChangingError,
    KeyExistsError,
    MogileFSError,
    NoneMatchError,
    OutcomeUnknownError,
    ProtocolError,
    StorageError,
    TrackerError,
    TrackerUnavailableError,
    UnknownKeyError,
    UnregClassError,
    UnregDomainError,
    UploadError,
    UploadOutcomeUnknownError,
)
from .views import serve_header
from .middleware import MogileFSMiddleware
from .upload import Uploader

__version__ = "0.1.0"

__all__ = [
    "Admin",
    "AsyncClient",
    "BadKeyError",
    "CacheBackend",
    "Client",
    "FileInfo",
    "KeyChangingError",
    "KeyExistsError",
    "MemoryCache",
    "MogileFSError",
    "MogileFSMiddleware",
    "NoneMatchError",
    "OutcomeUnknownError",
    "ProtocolError",
    "StorageError",
    "TrackerError",
    "TrackerUnavailableError",
    "UnknownKeyError",
    "UnregClassError",
    "UnregDomainError",
    "UploadError",
    "UploadOutcomeUnknownError",
    "Uploader",
    "__version__",
    "serve_header",
]
