"""Creating a bucket: the one S3 request obstore has no API for, signed here (SigV4).

Why mlwf signs this one request itself, in 40 lines (:func:`sigv4_headers`):

* obstore can presign it (``obstore.sign(store, "PUT", "")`` gives the
  bucket's URL with query-string authentication), but not every S3 service
  accepts query-string authentication for bucket operations: moto's IAM
  checks, which the tests use to verify that every request is signed, read
  only the ``Authorization`` header;
* botocore's ``SigV4Auth`` would do, but botocore is not a dependency of mlwf
  (its S3 client is obstore) and installs about 100 MB for this one request.

The signature is checked by the test suite against moto's verifier with real
IAM credentials. The request goes out with :mod:`http.client`, retried like
obstore's own (5xx answers, connection errors) with backoff, and bounded by
``MLWF_S3_TIMEOUT`` as a whole: the deadline is enforced on the socket itself
(shut down when it passes), so a server that answers a byte at a time cannot
stretch it.
"""

from __future__ import annotations

import datetime as _dt
import hashlib
import hmac
import http.client
import re
import socket
import threading
import time
import urllib.parse

from mlwf.errors import StoreError
from mlwf.storage.s3.config import CREDENTIAL_HINT, DEFAULT_REGION, ENV_TIMEOUT, Credentials, S3Target, endpoint_hint
from mlwf.storage.s3.errors import scrub, who


def create_bucket(store: S3Target) -> None:
    """Create the store's bucket; an existing bucket owned by these credentials is fine.

    Raises
    ------
    StoreError
        The name is taken by another account, access is denied, or the server
        kept failing or could not be reached within ``MLWF_S3_TIMEOUT``.
    """
    body = b""
    if store.region != DEFAULT_REGION:
        body = ('<CreateBucketConfiguration xmlns="http://s3.amazonaws.com/doc/2006-03-01/">'
                f"<LocationConstraint>{store.region}</LocationConstraint></CreateBucketConfiguration>").encode()
    status, text = _send(store, "PUT", body)
    if 200 <= status < 300 or "BucketAlreadyOwnedByYou" in text:
        return
    code = re.search(r"<Code>([^<]{1,64})</Code>", text)
    code_s = code.group(1) if code else f"HTTP {status}"
    what = f"create bucket {store.bucket!r} at {store.location}"
    if code_s == "BucketAlreadyExists":
        raise StoreError(f"cannot {what}: the name is taken by another account; choose another --bucket")
    if status in (401, 403) or code_s in ("AccessDenied", "InvalidAccessKeyId", "SignatureDoesNotMatch"):
        raise StoreError(f"access denied: {what} using {who(store)} ({code_s}): {CREDENTIAL_HINT}, and that this "
                         "user may create buckets")
    if status >= 500:
        raise StoreError(
            f"cannot create bucket {store.bucket!r}: S3 server at {store.location} kept answering HTTP {status} "
            f"({scrub(code_s, store.credentials)}) after retrying for {store.timeouts.retry:.1f} s: it is overloaded "
            f"or failing; try again later or raise {ENV_TIMEOUT}")
    raise StoreError(f"cannot {what}: the server answered HTTP {status} ({scrub(code_s, store.credentials)})")


def _bucket_location(store: S3Target) -> tuple[str, str]:
    """``(base URL, path)`` of the bucket's root, addressed as obstore addresses the store."""
    if store.endpoint:
        return store.endpoint, "/" + store.bucket
    if "." not in store.bucket:
        return f"https://{store.bucket}.s3.{store.region}.amazonaws.com", "/"
    return f"https://s3.{store.region}.amazonaws.com", "/" + store.bucket


def _send(store: S3Target, method: str, body: bytes) -> tuple[int, str]:
    """One signed request, retried like obstore's (5xx, connection errors), all within ``MLWF_S3_TIMEOUT`` s."""
    t = store.timeouts
    base, path = _bucket_location(store)
    parts = urllib.parse.urlsplit(base)
    deadline = time.monotonic() + t.total
    delay = 0.1
    while True:
        headers = {"content-length": str(len(body))}
        if store.credentials is not None:
            headers.update(sigv4_headers(method, parts.netloc, path, store.region, store.credentials, body))
        conn_cls = http.client.HTTPSConnection if parts.scheme == "https" else http.client.HTTPConnection
        left = max(deadline - time.monotonic(), 0.01)
        conn = conn_cls(parts.hostname, parts.port, timeout=min(t.connect, left))
        cutoff = threading.Timer(left, _shut_down, (conn,))
        cutoff.daemon = True
        cutoff.start()
        try:
            conn.connect()
            conn.sock.settimeout(t.read)
            conn.request(method, path, body=body, headers={"Host": parts.netloc, **headers})
            resp = conn.getresponse()
            status, text = resp.status, resp.read(65536).decode("utf-8", "replace")
            if status < 500 or time.monotonic() >= deadline - t.connect:
                return status, text
        # AttributeError/ValueError: the socket was shut down (and closed) under a read.
        except (OSError, http.client.HTTPException, AttributeError, ValueError) as e:
            if time.monotonic() >= deadline - 0.01:
                raise StoreError(
                    f"cannot reach (or get a complete answer from) the S3 endpoint {store.location} to create bucket "
                    f"{store.bucket!r} ({type(e).__name__}; gave up after {t.total:g} s, {ENV_TIMEOUT}): "
                    f"{endpoint_hint(store.endpoint_source)}") from None
        finally:
            cutoff.cancel()
            conn.close()
        time.sleep(min(delay, max(deadline - time.monotonic() - t.connect, 0.0)))
        delay = min(delay * 2, t.max_backoff)


def _shut_down(conn: http.client.HTTPConnection) -> None:
    """Make every read or write on ``conn`` fail now (its deadline passed)."""
    sock = conn.sock
    if sock is not None:
        try:
            sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass


def _hmac(key: bytes, msg: str) -> bytes:
    return hmac.new(key, msg.encode("utf-8"), hashlib.sha256).digest()


def sigv4_headers(method: str, host: str, path: str, region: str, creds: Credentials, body: bytes,
                  now: _dt.datetime | None = None) -> dict[str, str]:
    """Headers signing a request without query string (AWS Signature Version 4, service s3)."""
    now = now or _dt.datetime.now(_dt.timezone.utc)
    amz_date = now.strftime("%Y%m%dT%H%M%SZ")
    day = amz_date[:8]
    payload = hashlib.sha256(body).hexdigest()
    headers = {"host": host, "x-amz-content-sha256": payload, "x-amz-date": amz_date}
    if creds.token:
        headers["x-amz-security-token"] = creds.token
    names = sorted(headers)
    signed = ";".join(names)
    canonical = "\n".join([method, urllib.parse.quote(path, safe="/~"), "",  # no query string
                           *(f"{n}:{headers[n].strip()}" for n in names), "", signed, payload])
    scope = f"{day}/{region}/s3/aws4_request"
    to_sign = "\n".join(["AWS4-HMAC-SHA256", amz_date, scope, hashlib.sha256(canonical.encode()).hexdigest()])
    key = _hmac(_hmac(_hmac(_hmac(("AWS4" + creds.secret_key).encode(), day), region), "s3"), "aws4_request")
    signature = hmac.new(key, to_sign.encode(), hashlib.sha256).hexdigest()
    out = {k: v for k, v in headers.items() if k != "host"}
    out["authorization"] = (f"AWS4-HMAC-SHA256 Credential={creds.access_key}/{scope}, SignedHeaders={signed}, "
                            f"Signature={signature}")
    return out
