"""The exceptions raised by mogile_middleware.

Every error derives from :class:`MogileFSError`. A tracker's ``ERR <code> <text>`` reply becomes
the :class:`TrackerError` subclass registered for that code (or :class:`TrackerError` itself for
a code this module does not know), with the code and the tracker's text kept on the exception.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Mapping


class MogileFSError(Exception):
    """Base class of every error raised by this package."""


class BadKeyError(MogileFSError, ValueError):
    """A key the client refuses to send: empty, or text UTF-8 cannot encode (also a ``list_keys``
    prefix); as a key to create (stored, renamed to), also one over 255 bytes or holding NUL, CR or LF."""


class ProtocolError(MogileFSError):
    """The tracker sent something that is not a reply line: garbage, a cut line, an oversized line.

    The connection it came on is discarded.
    """


class TrackerUnavailableError(MogileFSError):
    """No tracker could be reached or none answered in time (all dead, refused or timed out)."""


class OutcomeUnknownError(TrackerUnavailableError):
    """A command that is not safe to repeat reached a tracker, and its answer was lost: it may or
    may not have been carried out."""


class StorageError(MogileFSError):
    """A storage node refused, dropped or failed an HTTP request (connection error or non-2xx)."""

    def __init__(self, message: str, url: str = "", status: int | None = None) -> None:
        super().__init__(message)
        self.url = url
        self.status = status


class KeyChangingError(MogileFSError):
    """A key was replaced again and again while it was looked up, so which file it names is not
    known yet: a writer overwriting it many times a second."""


class UploadError(MogileFSError):
    """An upload did not complete; the key keeps its old data, unless the message says that the
    tracker failed ``create_close`` itself (it may have dropped the old data or recorded the new)."""


class UploadOutcomeUnknownError(UploadError):
    """``create_close`` was sent but its answer was lost (the tracker or the network failed):
    the key may or may not point at the new data. Read it back, or upload again, to know."""


class TrackerError(MogileFSError):
    """The tracker answered ``ERR <code> <text>``; ``code`` and ``text`` keep what it said."""

    code: str = ""

    def __init__(self, code: str, text: str = "") -> None:
        super().__init__(f"{code}: {text}" if text and text != code else code)
        self.code = code
        self.text = text


class UnknownKeyError(TrackerError):
    """The key does not exist in the domain (``unknown_key``)."""


class InvalidKeyError(UnknownKeyError):
    """``updateclass`` on a key that does not exist (``invalid_key``)."""


class NoKeyError(TrackerError):
    """The command needs a key and got none or an empty one (``no_key``)."""


class NoDomainError(TrackerError):
    """The command needs a domain and got none or an empty one (``no_domain``)."""


class UnregDomainError(TrackerError):
    """The domain is not registered on the tracker (``unreg_domain``): check the domain name."""


class DomainNotFoundError(UnregDomainError):
    """An admin command named a domain that does not exist (``domain_not_found``): an
    :class:`UnregDomainError` of another name, caught alike."""


class DomainExistsError(TrackerError):
    """``create_domain`` for a domain that already exists (``domain_exists``)."""


class UnregClassError(TrackerError):
    """The class is not registered in the domain (``unreg_class``): create it first."""


class ClassNotFoundError(UnregClassError):
    """The class does not exist in the domain (``class_not_found``, as ``updateclass`` and
    ``update_class`` say it): an :class:`UnregClassError` of another name, caught alike."""


class ClassExistsError(TrackerError):
    """``create_class`` for a class that already exists (``class_exists``)."""


class NoClassError(TrackerError):
    """The command needs a class and got none (``no_class``)."""


class KeyExistsError(TrackerError):
    """``rename`` onto a key that already exists (``key_exists``)."""


class NoneMatchError(TrackerError):
    """``list_keys`` found no key with that prefix after that value (``none_match``)."""


class AfterMismatchError(TrackerError):
    """``list_keys`` with an ``after`` value that does not start with the prefix."""


class NoDevicesError(TrackerError):
    """The tracker has no writable device for a new file (``no_devices``)."""


class SizeMismatchError(TrackerError):
    """``create_close`` found a stored size other than the one sent (``size_mismatch``)."""


class SizeVerifyError(TrackerError):
    """``create_close`` could not find or reach the uploaded file (``size_verify_error``)."""


class ChecksumMismatchError(TrackerError):
    """``create_close`` found a stored checksum other than the one sent (``checksum_mismatch``)."""


class NoTempFileError(TrackerError):
    """``create_close`` for a file that is not open or already closed (``no_temp_file``)."""


class UnknownCommandError(TrackerError):
    """The tracker does not know the command (``unknown_command``)."""


_ERRORS_BY_CODE: dict[str, type[TrackerError]] = {
    "unknown_key": UnknownKeyError,
    "invalid_key": InvalidKeyError,
    "no_key": NoKeyError,
    "no_domain": NoDomainError,
    "unreg_domain": UnregDomainError,
    "domain_not_found": DomainNotFoundError,
    "domain_exists": DomainExistsError,
    "unreg_class": UnregClassError,
    "class_not_found": ClassNotFoundError,
    "class_exists": ClassExistsError,
    "no_class": NoClassError,
    "key_exists": KeyExistsError,
    "none_match": NoneMatchError,
    "after_mismatch": AfterMismatchError,
    "no_devices": NoDevicesError,
    "size_mismatch": SizeMismatchError,
    "size_verify_error": SizeVerifyError,
    "checksum_mismatch": ChecksumMismatchError,
    "no_temp_file": NoTempFileError,
    "unknown_command": UnknownCommandError,
}


def tracker_error(code: str, text: str) -> TrackerError:
    """Build the exception registered for a tracker error code."""
    return _ERRORS_BY_CODE.get(code, TrackerError)(code, text)


def _keys(args: Mapping[str, object]) -> tuple[object, object]:
    """The key a command is about (``key``, or a rename's ``from_key``) and a rename's ``to_key``,
    ``None`` where there is none, each given as bytes named as text."""
    return _text(args.get("key", args.get("from_key"))), _text(args.get("to_key"))


def _text(key: object) -> object:
    """A key given as bytes as the text it names (bytes not UTF-8 as surrogate escapes)."""
    return key.decode("utf-8", "surrogateescape") if isinstance(key, bytes) else key


def _said(template: str, names: Mapping[str, object]) -> str:
    """``template`` naming ``names`` as messages name them (their ``repr``)."""
    return template.format_map({name: repr(value) for name, value in names.items()})


def named(error: TrackerError, args: Mapping[str, object], domain: str) -> TrackerError:
    """``error`` (of the same class, code and ``text``) with a message naming what it is about,
    from the arguments of the command it answers: the tracker's words name no key, class or
    domain (``ERR unknown_key unknown_key``)."""
    key, to_key = _keys(args)
    if isinstance(error, UnknownKeyError) and key is not None:
        naming = ("no key {key} in domain {domain}", {"key": key, "domain": domain})
    elif isinstance(error, KeyExistsError) and to_key is not None:
        naming = ("key {key} exists already in domain {domain}", {"key": to_key, "domain": domain})
    elif isinstance(error, UnregDomainError):  # DomainNotFoundError too
        naming = ("no domain {domain} on the trackers", {"domain": domain})
    elif isinstance(error, UnregClassError) and args.get("class") is not None:  # ClassNotFoundError too
        naming = ("class {cls} is not registered in domain {domain}", {"cls": args["class"], "domain": domain})
    elif isinstance(error, DomainExistsError):
        naming = ("domain {domain} exists already", {"domain": domain})
    elif isinstance(error, ClassExistsError) and args.get("class") is not None:
        naming = ("class {cls} exists already in domain {domain}", {"cls": args["class"], "domain": domain})
    elif error.code in ("domain_has_files", "domain_has_classes"):
        naming = (f"domain {{domain}} still has {error.code.rpartition('_')[2]}", {"domain": domain})
    elif error.code == "class_has_files" and args.get("class") is not None:
        naming = ("class {cls} of domain {domain} still has files", {"cls": args["class"], "domain": domain})
    elif error.code == "invalid_replpolicy" and args.get("replpolicy") is not None:
        naming = ("the trackers have no replication policy {policy}, for class {cls} of domain {domain}",
                  {"policy": args["replpolicy"], "cls": args.get("class"), "domain": domain})
    else:
        return error
    template, names = naming
    described = type(error)(error.code, _said(template, names))
    described.text = error.text
    #: The message's words and what they name, for a program that shows names its own way (the command line).
    described.naming = naming  # type: ignore[attr-defined]
    return described


@contextlib.contextmanager
def named_errors(args: Mapping[str, object], domain: str) -> Iterator[None]:
    """Around a command with ``args`` in ``domain``: its tracker errors :func:`named`, and a lost
    answer naming the key whose state it leaves unknown (the tracker's address alone did not)."""
    try:
        yield
    except TrackerError as error:
        raise named(error, args, domain) from None
    except OutcomeUnknownError as error:
        key, to_key = _keys(args)
        if key is not None:  # the same error, its traceback kept, its message naming the keys
            names = {"key": key, "domain": domain} if to_key is None else {"key": key, "to_key": to_key, "domain": domain}
            template = ("key {key}" if to_key is None else "keys {key} and {to_key}") + " in domain {domain}: " + \
                str(error).replace("{", "{{").replace("}", "}}")
            error.args = (_said(template, names),)
            error.naming = (template, names)  # type: ignore[attr-defined] # as named() gives it
        raise
