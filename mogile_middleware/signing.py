"""Signed, expiring URLs: an HMAC-SHA256 of the domain, the path and the expiry time.

The path is what the URL names after the prefix, decoded: the key itself, or what the middleware's
``key_for_path`` maps to one. A URL under the prefix then carries exactly
``?expires=<unix time>&signature=<43 characters>``: anything else in the query (another parameter,
a repeated one, another order) is refused, and so is a signature made for another path, another
domain or another time. Several secrets may be
given, for rotation: the first signs, every one verifies, each compared in constant time.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import math
import re
import time
from collections.abc import Callable, Sequence

#: The only query a signed URL has.
_QUERY = re.compile(r"expires=([1-9][0-9]{0,11})&signature=([A-Za-z0-9_-]{43})")  # one spelling per time
#: The latest expiry (Unix time) the query holds: 12 digits.
LATEST_EXPIRY = 10**12 - 1
#: Signatures of this scheme never verify under another.
_SCHEME = b"mogile_middleware signed URL v1\n"

#: Why a request was refused (the reason of its 403).
UNSIGNED = "This file needs a signed link."
BAD_SIGNATURE = "The link's signature is not valid."
EXPIRED = "The link has expired."

Secret = str | bytes


def secrets_given(name: str, secrets: object) -> list[bytes]:
    """``secrets``, one string or bytes or a list of them (the first signs, each verifies), as
    bytes; a ValueError naming the option ``name`` and what was wrong, never a secret."""
    # A list or a tuple, in order (the first signs): not a set, nor a mapping's keys.
    given = [secrets] if isinstance(secrets, (str, bytes)) else \
        list(secrets) if isinstance(secrets, (list, tuple)) else None
    if given is None or any(not isinstance(secret, (str, bytes)) for secret in given):
        wrong = type(secrets).__name__ if given is None else \
            next(f"a list holding {type(secret).__name__}" for secret in given if not isinstance(secret, (str, bytes)))
        raise ValueError(f"{name} must be a non-empty string or bytes, or a list of them, not {wrong}")
    if not given or not all(secret.strip() for secret in given):  # blanks alone: a template left unfilled
        raise ValueError(f"{name} must be a non-empty string or bytes, or a list of them, not "
                         f"{'an empty list' if not given else 'an empty one, or one of blanks only'}")
    return [secret.encode("utf-8") if isinstance(secret, str) else secret for secret in given]


class URLSigner:
    """Signs and checks the query of a URL path in ``domain`` with ``secrets`` (one, or several for rotation)."""

    def __init__(self, secrets: Secret | Sequence[Secret], domain: str,
                 clock: Callable[[], float] = time.time) -> None:
        self._secrets = secrets_given("signing_key", secrets)
        self._domain = domain.encode("utf-8")
        self._clock = clock

    def query(self, path: str, expires_in: float) -> str:
        """The query string that opens ``path`` for ``expires_in`` seconds from now."""
        if isinstance(expires_in, bool) or not isinstance(expires_in, (int, float)) or not 0 < expires_in < math.inf:
            raise ValueError(f"expires_in must be a number of seconds > 0, not {expires_in!r}")
        expires = math.ceil(self._clock() + expires_in)  # whole seconds, never shorter than asked
        if expires > LATEST_EXPIRY:
            raise ValueError(f"expires_in {expires_in!r} ends after the latest time a signed URL holds "
                             f"({LATEST_EXPIRY})")
        return f"expires={expires}&signature={self._signature(self._secrets[0], path, expires)}"

    def refusal(self, path: str, query: str, *, grace: float = 0.0) -> str | None:
        """``None`` when ``query`` is a valid signature for ``path``, unexpired (or expired less
        than ``grace`` seconds ago); else the reason to refuse."""
        match = _QUERY.fullmatch(query)
        if match is None:
            return UNSIGNED if not query else BAD_SIGNATURE
        expires, signature = int(match[1]), match[2]
        valid = False
        for secret in self._secrets:  # every one, so the time taken does not say which matched
            valid |= hmac.compare_digest(self._signature(secret, path, expires), signature)
        if not valid:
            return BAD_SIGNATURE
        return EXPIRED if expires < self._clock() - grace else None

    def _signature(self, secret: bytes, path: str, expires: int) -> str:
        message = b"%s%s\n%s\n%d" % (_SCHEME, self._domain, path.encode("utf-8"), expires)
        digest = hmac.new(secret, message, hashlib.sha256).digest()
        return base64.urlsafe_b64encode(digest).rstrip(b"=").decode("ascii")
