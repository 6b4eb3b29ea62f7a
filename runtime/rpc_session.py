"""A TVM RPC session whose every call is bounded in time, so a dead or hung device is an error, not a hang.

A device whose RPC server dies closes its socket and the pending call fails at once ("connection
reset by peer"); that error becomes a :class:`DeviceError` naming the device. A device that hangs
(stopped, wedged, or a network that drops packets) keeps the socket open, and TVM's C++ client
would wait in ``recv`` forever. So each call runs in a worker thread and the caller waits at most
its bound; past it, the session's TCP connection is shut down (``shutdown(2)`` on the socket TVM
reads, found by its address pair when the session was opened), which wakes the worker, and the
caller gets a DeviceError. A worker left blocked instead would abort the process at exit.

The session serves one call at a time (a TVM RPC session is one request/response channel).
Needs psutil to find the session's socket; without it, calls run unbounded in the caller's thread.
"""

from __future__ import annotations

import contextlib
import os
import socket
import threading
from collections.abc import Callable
from typing import Any

from reshift.errors import ReshiftError

DEFAULT_TIMEOUT = 60.0  # seconds a device may take to answer one call, beyond its expected run time
RESTART_HINT = (
    "Check that the device is up (`python examples/edge/device.py status`), restart it "
    "(`make edge-device`) and retry; for a slow device raise --timeout."
)

Connection = tuple[int, tuple[str, int], tuple[str, int]]  # (fd, local address, remote address)


class DeviceError(ReshiftError):
    """The remote device cannot be reached or cannot run this artifact; the message says what to do.

    ``reason`` is the device's own error line when there is one (for callers that refine the message).
    """

    def __init__(self, message: str, reason: str | None = None):
        super().__init__(message)
        self.reason = reason


class DeviceTimeout(DeviceError):
    """A remote call got no answer within its bound: the device is hung, unreachable or busy."""


class DeviceLost(DeviceError):
    """The connection to the device broke during a call: its RPC server died or was stopped."""


def tcp_connections() -> set[Connection] | None:
    """This process's TCP connections as (fd, local, remote) triples; None without psutil."""
    try:
        import psutil
    except ImportError:
        return None
    process = psutil.Process()
    listing = getattr(process, "net_connections", None) or process.connections  # psutil < 6: connections
    found = set()
    for conn in listing(kind="tcp"):
        if conn.fd >= 0 and conn.raddr:
            found.add((conn.fd, tuple(conn.laddr), tuple(conn.raddr)))
    return found


def cut(connections: set[Connection]) -> None:
    """Shut down these TCP connections (only while the fd still holds the same one), waking any reader."""
    current = tcp_connections() or set()
    for conn in connections & current:
        with contextlib.suppress(OSError):
            dup = socket.socket(fileno=os.dup(conn[0]))
            try:
                dup.shutdown(socket.SHUT_RDWR)
            finally:
                dup.close()


def last_line(exc: BaseException) -> str:
    """The informative last line of a (TVM) exception message."""
    lines = [line for line in str(exc).strip().splitlines() if line.strip()]
    return lines[-1].strip() if lines else type(exc).__name__


def run_bounded(fn: Callable[[], Any], bound: float, on_timeout: Callable[[], None]) -> Any:
    """``fn()`` in a daemon thread; its result or exception, or DeviceTimeout after ``bound`` seconds.

    On timeout ``on_timeout`` runs (it should unblock the worker, e.g. by cutting its socket) and the
    worker gets a few seconds to finish, so no thread stays blocked inside TVM.
    """
    outcome: dict[str, Any] = {}

    def work() -> None:
        try:
            outcome["value"] = fn()
        except BaseException as exc:  # noqa: BLE001 -- re-raised in the caller's thread
            outcome["error"] = exc

    worker = threading.Thread(target=work, name="reshift-rpc-call", daemon=True)
    worker.start()
    worker.join(bound)
    if worker.is_alive():
        on_timeout()
        worker.join(5.0)
        raise DeviceTimeout(f"no answer within {bound:.0f} s")
    if "error" in outcome:
        raise outcome["error"]
    return outcome.get("value")


def open_bounded(
    open_session: Callable[[], Any],
    bound: float,
    exclude: set[tuple[str, int]] = frozenset(),
    peer: tuple[str, int] | None = None,
) -> tuple[Any, set[Connection] | None]:
    """Open an RPC session within ``bound`` seconds; the session and the TCP connections it opened.

    The session's connections are those opened meanwhile, to ``peer`` when it is known, never to an
    ``exclude``d address (a tracker's); without a ``peer``, a connection another thread opens in the
    same instant would count as well. On timeout they are cut and DeviceTimeout is raised.
    """
    before = tcp_connections()
    if before is None:
        return open_session(), None

    def new_connections() -> set[Connection]:
        return (tcp_connections() or set()) - before

    def opened() -> set[Connection]:
        return {c for c in new_connections() if c[2] not in exclude and (peer is None or c[2] == peer)}

    # on timeout without a peer, cut every new connection: a tracker's too, in case it is the one waiting
    session = run_bounded(open_session, bound, lambda: cut(opened() if peer else new_connections()))
    return session, opened()


class BoundedSession:
    """A TVM RPC session (attributes delegate to it) plus :meth:`call`, which bounds each remote call.

    ``where`` names the device in messages ("the device at 127.0.0.1:9090"); ``timeout`` is the
    default bound in seconds; ``connections`` are the session's sockets (None: calls unbounded).
    """

    def __init__(self, session: Any, where: str, connections: set[Connection] | None, timeout: float):
        self.session = session
        self.where = where
        self.timeout = timeout
        self._connections = connections or set()
        self._lock = threading.Lock()
        self._dead: str | None = None

    def __getattr__(self, name: str) -> Any:
        if name == "session":  # not set yet (copy, unpickling): no recursion
            raise AttributeError(name)
        return getattr(self.session, name)

    def __repr__(self) -> str:
        return f"<BoundedSession {self.where}, timeout {self.timeout:g} s>"

    def __enter__(self) -> BoundedSession:
        return self

    def __exit__(self, *exc_info: Any) -> None:
        self.close()

    def close(self) -> None:
        """End the session now, so the device's server takes the next client; later calls raise DeviceError.

        Dropping the last reference ends it too, but only when the garbage collector gets to it.
        """
        self._dead = self._dead or "the session was closed"
        cut(self._connections)

    def call(self, what: str, fn: Callable[..., Any], *args: Any, bound: float | None = None) -> Any:
        """``fn(*args)`` on the device within ``bound`` seconds (default: the session's timeout).

        DeviceError naming the device and ``what`` was being done when the connection is lost, the
        device raises, or it does not answer in time (then the session is closed for good).
        """
        if self._dead:
            raise DeviceError(f"{self.where} is no longer usable ({self._dead}); reconnect and deploy again")
        bound = self.timeout if bound is None else bound
        with self._lock:
            try:
                if not self._connections:
                    return fn(*args)
                return run_bounded(lambda: fn(*args), bound, lambda: cut(self._connections))
            except DeviceTimeout:
                self._dead = f"it did not answer within {bound:.0f} s"
                raise DeviceTimeout(
                    f"{self.where} did not answer within {bound:.0f} s while {what}: the device is hung or "
                    f"unreachable; the session was closed. {RESTART_HINT}"
                ) from None
            except ReshiftError:
                raise
            except Exception as exc:  # noqa: BLE001 -- a TVM error becomes one readable message
                raise self._device_error(what, exc) from None

    def _device_error(self, what: str, exc: BaseException) -> DeviceError:
        reason = last_line(exc)
        lost = ("Connection reset", "Broken pipe", "Socket", "code=", "closed", "EOF", "timed out")
        if any(word in reason for word in lost):
            self._dead = f"the connection was lost: {reason}"
            return DeviceLost(
                f"lost the connection to {self.where} while {what} ({reason}): the device or its RPC server "
                f"stopped. {RESTART_HINT}",
                reason,
            )
        return DeviceError(f"{self.where} failed while {what}: {reason}", reason)
