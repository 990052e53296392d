"""Joining Ray: a local instance started (and reaped) here, or a cluster probed before Ray's own client
tries for minutes; which hosts count as this machine."""

from __future__ import annotations

import logging
import os
import socket
import subprocess
import sys
import threading
import time

import ray

from mlwf.backends import lifeline
from mlwf.errors import UsageError

#: Seconds to wait for a cluster at an address before giving up (MLWF_RAY_CONNECT_TIMEOUT).
CONNECT_TIMEOUT = 15.0

_lock = threading.Lock()
_users = 0  # backends between join() and leave()
_ours = False  # True when this module called ray.init (so it calls ray.shutdown)
_reaper: lifeline.Reaper | None = None  # kills what is left of the local instance we started


def join(address: str | None, connect_timeout: float, *, token_missing: bool = False,
         local_fallback: bool = True) -> None:
    """Join the cluster at ``address`` (None or ``local``: start a local instance), or use the
    connection this process has; :class:`UsageError` (one line) if that cannot be done.
    ``local_fallback``: the caller could run on a local instance instead (its error says so)."""
    global _users, _ours
    with _lock:
        if not ray.is_initialized():
            _init(address, connect_timeout, token_missing, local_fallback)
            _ours = True
        _users += 1


def leave() -> None:
    """One backend fewer; the last one shuts down a local instance started here."""
    global _users, _ours, _reaper
    with _lock:
        _users -= 1
        if _users == 0 and _ours:
            _ours = False
            ray.shutdown()
            if _reaper is not None:
                _reaper.close()
                _reaper = None


def _init(address: str | None, connect_timeout: float, token_missing: bool, local_fallback: bool) -> None:
    global _reaper
    quiet = dict(include_dashboard=False, log_to_driver=False, logging_level=logging.ERROR)
    if address is None or address == "local":
        before = lifeline.children(os.getpid())
        try:
            with _loopback_node():
                ray.init(address="local", _node_ip_address=LOOPBACK, **quiet)
        except Exception as e:  # noqa: BLE001 - Ray raises many kinds; say what happened in one line
            raise UsageError(f"could not start a local Ray instance: {first_line(e)}") from None
        # The processes ray.init just started are the instance's (gcs_server, raylet, ...).
        _reaper = lifeline.Reaper(lifeline.children(os.getpid()) - before)
        return
    probe(address, connect_timeout, token_missing=token_missing, local_fallback=local_fallback)
    try:
        ray.init(address=address, log_to_driver=False, logging_level=logging.ERROR)
    except Exception as e:  # noqa: BLE001
        raise UsageError(f"could not join the Ray cluster at {address}: {first_line(e)}") from None


#: The address of the local Ray instance mlwf starts for itself: nothing of it is reachable from elsewhere.
LOOPBACK = "127.0.0.1"


class _loopback_node:
    """While a local instance starts: make Ray take this machine's loopback address as the node's.

    Ray's servers (GCS, raylet, object manager, every worker, the runtime-env and dashboard
    agents) listen on all interfaces, or the host's address, unless the node's address is
    loopback; and on Linux ``ray.init`` replaces a loopback ``_node_ip_address`` with the
    host's address, unless Ray runs as on macOS or Windows, single-machine only
    (``RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0``). That setting is read once, at import, into
    ``ray_constants.ENABLE_RAY_CLUSTER``: it is switched for the start only, so joining a
    real cluster later in the same process still finds the host's address. The processes
    started take the node's address from their command lines.
    """

    def __enter__(self) -> None:
        from ray._private import ray_constants

        self._constants = ray_constants
        self._saved = getattr(ray_constants, "ENABLE_RAY_CLUSTER", None)
        ray_constants.ENABLE_RAY_CLUSTER = False

    def __exit__(self, *exc) -> None:
        if self._saved is not None:
            self._constants.ENABLE_RAY_CLUSTER = self._saved


def first_line(e: BaseException) -> str:
    """``Type: first line of the message``."""
    lines = str(e).strip().splitlines()
    return f"{type(e).__name__}: {lines[0]}" if lines else type(e).__name__


_PROBE = r"""
import sys
try:
    from ray._raylet import GcsClient
    from ray._private.services import canonicalize_bootstrap_address
except Exception:
    print("skip")
    sys.exit(0)
try:
    address = canonicalize_bootstrap_address(sys.argv[1])
    if address is None:
        raise ConnectionError("no running Ray instance found on this machine")
    GcsClient(address=address).cluster_id
except Exception as e:
    lines = str(e).strip().splitlines()
    print("error", type(e).__name__ + ":", lines[0] if lines else "")
else:
    print("ok")
"""


def connect_timeout(settings, configured: float | None = None) -> float:
    """Seconds to wait for a cluster: ``configured``, else ``MLWF_RAY_CONNECT_TIMEOUT``, else
    :data:`CONNECT_TIMEOUT`; :class:`UsageError` unless between 0 and 3600."""
    value = configured if configured is not None else settings.seconds("MLWF_RAY_CONNECT_TIMEOUT", CONNECT_TIMEOUT)
    if isinstance(value, bool) or not (isinstance(value, (int, float)) and 0 < value <= 3600):
        given = value if configured is not None else settings.variable("MLWF_RAY_CONNECT_TIMEOUT")
        raise UsageError(f"MLWF_RAY_CONNECT_TIMEOUT must be a number of seconds between 0 and 3600, got {given!r}")
    return float(value)


def check_address(address: str | None) -> None:
    """Refuse (:class:`UsageError`, one line) an address that is not None, ``auto``, ``local`` or ``HOST:PORT``."""
    if address and address.startswith("ray://"):
        raise UsageError(f"--ray-address {address}: Ray Client (ray://) addresses are not supported; give "
                         "the head's GCS address HOST:6379, or run mlwf on the cluster "
                         "(ray job submit -- mlwf run …)")
    if address not in (None, "auto", "local") and split_address(address) is None:
        raise UsageError(f"--ray-address {address!r} is not HOST:PORT (the head's GCS address, "
                         "e.g. 10.0.0.5:6379) or 'auto'")


def split_address(address: str) -> tuple[str, int] | None:
    host, sep, port = address.rpartition(":")
    if not sep or not host or not port.isdigit():
        return None
    return host.strip("[]"), int(port)


def local_ips() -> set[str]:
    ips = {"127.0.0.1", "::1", "0.0.0.0", "localhost", socket.gethostname()}
    try:
        ips.update(socket.gethostbyname_ex(socket.gethostname())[2])
    except OSError:
        pass
    try:
        ips.add(ray.util.get_node_ip_address())
    except Exception:  # noqa: BLE001 - best effort
        pass
    return ips


def is_local_address(address: str | None) -> bool:
    if address in (None, "", "local", "auto"):
        return True
    parsed = split_address(address)
    if parsed is None:
        return False
    host = parsed[0]
    return host.startswith("127.") or host in local_ips()


_TOKEN_HINT = ("set RAY_AUTH_TOKEN (or RAY_AUTH_TOKEN_PATH, the path of a file holding it) to the cluster's "
               "token; see https://docs.ray.io/en/latest/ray-security/token-auth.html")


def probe(address: str, timeout: float, *, token_missing: bool = False, local_fallback: bool = True) -> None:
    """Make sure a Ray cluster answers at ``address`` within ``timeout`` seconds.

    Raises :class:`UsageError` (one line) otherwise. Ray's own client retries
    for minutes and logs every attempt, so the check runs first: a TCP connect,
    then Ray's GCS client in a child process that is killed at the deadline.
    ``token_missing`` (:attr:`mlwf.settings.Settings.ray_token_missing`): token
    authentication is on and no token is set, which Ray's client would answer
    by aborting the process; it is refused first, naming the variables.
    """
    deadline = time.monotonic() + timeout
    if token_missing:
        raise UsageError(f"RAY_AUTH_MODE=token but no authentication token for the Ray cluster at {address}: "
                         f"{_TOKEN_HINT}")
    where = f"no Ray cluster answers at {address}"
    hint = "check --ray-address / RAY_ADDRESS (the head node's GCS address, HOST:6379)" + \
        (", or leave it unset to start a local Ray instance" if local_fallback else "")
    parsed = split_address(address) if address != "auto" else None
    if parsed is not None:
        try:
            with socket.create_connection(parsed, timeout=max(0.1, timeout)):
                pass
        except TimeoutError:
            raise UsageError(f"{where} (no answer within {timeout:g} s): {hint}") from None
        except OSError as e:
            raise UsageError(f"{where} ({e.strerror or e}): {hint}") from None
    left = max(0.5, deadline - time.monotonic())
    try:
        out = subprocess.run([sys.executable, "-c", _PROBE, address], capture_output=True, text=True,
                             timeout=left, stdin=subprocess.DEVNULL)
    except subprocess.TimeoutExpired:
        raise UsageError(f"{where} (nothing that speaks Ray's protocol answered within {timeout:g} s): "
                         f"{hint}") from None
    result = (out.stdout.strip().splitlines() or ["error no answer"])[-1]
    if result in ("ok", "skip"):
        return
    detail = result.removeprefix("error ").strip()
    if detail.startswith("AuthenticationError"):
        raise UsageError(f"the Ray cluster at {address} requires an authentication token: set "
                         f"RAY_AUTH_MODE=token, and {_TOKEN_HINT}")
    if "authentication token" in out.stderr:  # Ray aborted on a token it could not read
        raise UsageError(f"Ray found no usable authentication token for the cluster at {address}: {_TOKEN_HINT}")
    raise UsageError(f"{where} ({detail[:200]}): {hint}")
