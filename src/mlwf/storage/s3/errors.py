"""obstore's failures as mlwf's one-line errors, with no credential in them.

Every failure of a request becomes a :class:`~mlwf.errors.StoreError` (or
:class:`~mlwf.errors.NotFoundError`) with our own message: what was being
done, on which bucket at which endpoint, and what to check. obstore's own
text is never shown whole; what little of it is kept (an S3 error code, a
short reason) is scrubbed of the access key, the secret, the session token
and any signature, in case the server echoed them.

None of these errors is retryable for the engine (``retryable`` is False):
the S3 client has already retried throttling, 5xx answers and dropped
connections within the operation's time bound (:class:`~mlwf.storage.s3.config.S3Timeouts`),
and retrying the whole call would multiply the bound docs/s3.md promises.
"""

from __future__ import annotations

import re

from mlwf.errors import NotFoundError, StoreError
from mlwf.storage.s3.config import CREDENTIAL_HINT, ENV_TIMEOUT, Credentials, S3Target, endpoint_hint, strip_userinfo


class NoSuchBucketError(NotFoundError):
    """The bucket itself does not exist."""


class Overdue(Exception):
    """A request that did not finish within its bound (turned into a StoreError like every failure)."""

    def __init__(self, bound: float):
        super().__init__(f"no complete answer within {bound:.3g} s")
        self.bound = bound


class Failed(Exception):
    """An obstore failure with what we were doing, turned into a StoreError by the caller."""

    def __init__(self, op: str, key: str | None, exc: BaseException):
        super().__init__(op)
        self.op, self.key, self.exc = op, key, exc


def scrub(text: str, credentials: Credentials | None) -> str:
    """``text`` with every credential, signature and user info replaced by ``***``."""
    if credentials is not None:
        for secret in credentials.secrets():
            text = text.replace(secret, "***")
    text = re.sub(r"(Credential=)[^,\s\"'&]+", r"\1***", text)
    text = re.sub(r"(?i)(signature=)[0-9a-f]+", r"\1***", text)
    text = re.sub(r"(?i)(x-amz-security-token[=:]\s*)[^\s&\"']+", r"\1***", text)
    return strip_userinfo(text)


def scrub_detail(exc: BaseException, credentials: Credentials | None) -> str:
    """One short, credential-free line about ``exc``."""
    text = str(exc).split("\n\nDebug source:", 1)[0]
    code = re.search(r"<Code>([^<]{1,64})</Code>", text)
    text = re.sub(r"<\?xml.*", "", text, flags=re.S).strip().rstrip(":")
    text = " ".join(text.split())
    if code:
        text += f" ({code.group(1)})"
    text = scrub(text, credentials)
    return text[:300] + ("..." if len(text) > 300 else "")


def bucket_missing(store: S3Target) -> NoSuchBucketError:
    return NoSuchBucketError(
        f"bucket {store.bucket!r} does not exist at {store.location}: create it with --create-bucket, "
        "or check --bucket (and the endpoint)"
    )


def who(store: S3Target) -> str:
    """Where the store's credentials came from, for a message."""
    return store.credentials.source if store.credentials else "no credentials (anonymous)"


def store_error(store: S3Target, op: str, key: str | None, exc: BaseException) -> StoreError:
    """Turn an obstore exception raised doing ``op`` on ``key`` into our error; never carries its raw text."""
    from obstore import exceptions as oe

    if isinstance(exc, StoreError):
        return exc
    text = str(exc)
    if op == "list":
        what = f"list prefix {key!r}" if key else "list objects"
    else:
        what = f"{op} {key!r}" if key is not None else op
    where = f"(bucket {store.bucket!r} at {store.location})"
    total = store.timeouts.total
    if isinstance(exc, Overdue):
        return StoreError(
            f"cannot reach (or get a complete answer from) the S3 endpoint {store.location} to {what}: "
            f"{exc} ({ENV_TIMEOUT}={total:g} s, plus 1 s per MiB moved): "
            f"{endpoint_hint(store.endpoint_source)}, or raise {ENV_TIMEOUT}"
        )
    if "NoSuchBucket" in text:
        return bucket_missing(store)
    not_found = isinstance(exc, FileNotFoundError) or isinstance(exc, getattr(oe, "NotFoundError", ())) or (
        "404 Not Found" in text
    )
    if not_found:
        if op in ("list", "check the bucket") or "NoSuchKey" not in text and not store.bucket_exists():
            return bucket_missing(store)
        return NotFoundError(f"no object {key!r} in bucket {store.bucket!r} at {store.location}")
    if (
        isinstance(exc, (oe.PermissionDeniedError, oe.UnauthenticatedError))
        or re.search(r"\b40[13] (Forbidden|Unauthorized)", text)
        or any(c in text for c in ("AccessDenied", "InvalidAccessKeyId", "SignatureDoesNotMatch"))
    ):
        return StoreError(f"access denied: {what} {where} using {who(store)}: {CREDENTIAL_HINT}, "
                          "and that this user may use the bucket")
    if isinstance(exc, oe.InvalidPathError):
        return StoreError(
            f"cannot {what} {where}: the bucket holds a key obstore cannot represent "
            f"({scrub_detail(exc, store.credentials)}); rename or delete it with another S3 client"
        )
    status = re.search(r"non-2xx status code: (5\d\d)", text)
    if status:
        return StoreError(
            f"S3 server at {store.location} kept answering HTTP {status.group(1)} to {what} after retrying for "
            f"{store.timeouts.retry:.1f} s: it is overloaded or failing; try again later or raise {ENV_TIMEOUT}"
        )
    lowered = text.lower()
    if any(s in lowered for s in ("error sending request", "connect", "dns error", "timed out", "timeout",
                                  "broken pipe")):
        return StoreError(
            f"cannot reach (or get a complete answer from) the S3 endpoint {store.location} to {what} "
            f"(gave up after retrying for up to {total:g} s, {ENV_TIMEOUT}): {endpoint_hint(store.endpoint_source)}"
        )
    return StoreError(f"S3 {what} {where} failed: {scrub_detail(exc, store.credentials)}")
