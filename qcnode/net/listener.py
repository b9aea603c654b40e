"""One listening socket for all SCP processes of a node, with associations spread evenly over them.

Receiving is CPU-bound Python, so ``serve`` may run several SCP processes (``node.scp_processes``).
With SO_REUSEPORT the kernel assigns each connection to a process by a hash of its addresses, so
four senders land 2/2 only 3 times in 8 (1/3 or 4/0 otherwise) and the busiest process caps the
throughput. Instead the parent ``serve`` opens the listening socket once and hands it to its SCP
children; every process publishes how many associations it holds in a small shared array and only
accepts a waiting connection while no other process holds fewer (after ``ACCEPT_YIELD_S`` it
accepts anyway, so a stalled process cannot hold a sender back). Works for port 0 as well.

Every SCP server (shared listener or not) is a :class:`NodeAssociationServer`: a connection whose peer
has already closed it when it is accepted (a load balancer's health check: connect, close) is closed
at once, before pynetdicom starts its threads for an association; the listen backlog is
``LISTEN_BACKLOG`` (pynetdicom's is 5), so that a burst of such connections is not met with dropped SYNs;
a TLS handshake is done in the association's thread, not in the accepting one.
"""
from __future__ import annotations

import dataclasses
import errno
import multiprocessing
import socket
import ssl
import threading
import time
from typing import Any, cast

from pynetdicom.transport import ThreadedAssociationServer

ACCEPT_YIELD_S = 0.25   # a busier process waits at most this long for a less busy one to accept
_POLL_S = 0.002
LISTEN_BACKLOG = 128    # connections the kernel holds until they are accepted


@dataclasses.dataclass
class SharedListener:
    """A listening socket plus the shared per-process association counts; ``index`` is this
    process's slot. Picklable into spawned children (the socket is passed as a file descriptor)."""

    sock: socket.socket
    loads: Any            # multiprocessing RawArray("i", n)
    index: int = 0

    def for_process(self, index: int) -> "SharedListener":
        """The same listener for the SCP process with slot ``index``."""
        return dataclasses.replace(self, index=index)

    @property
    def processes(self) -> int:
        return len(self.loads)


def peer_closed(sock: socket.socket) -> bool:
    """True when the peer of an accepted connection has already closed it (end of stream or reset
    with nothing to read); never waits. A TLS connection is not looked at (it is not read before
    its handshake, done later in the association's thread)."""
    if isinstance(sock, ssl.SSLSocket):
        return False
    try:
        return sock.recv(1, socket.MSG_PEEK | socket.MSG_DONTWAIT) == b""
    except (BlockingIOError, InterruptedError):
        return False  # open, nothing sent yet
    except OSError:
        return True  # reset


class NodeAssociationServer(ThreadedAssociationServer):
    """pynetdicom's threaded server with a deeper listen backlog, closing connections whose peer has
    already gone when they are accepted instead of starting an association for them. With TLS the
    handshake is left to the association's first read, in its own thread: pynetdicom does it in the
    accepting thread, where one connection that sends nothing stops every other from being accepted."""

    request_queue_size = LISTEN_BACKLOG

    def get_request(self) -> tuple[socket.socket, Any]:
        client, address = cast(socket.socket, self.socket).accept()
        if self.ssl_context:
            client = self.ssl_context.wrap_socket(client, server_side=True, do_handshake_on_connect=False)
        return client, address

    def verify_request(self, request: Any, client_address: Any) -> bool:
        return not peer_closed(request)  # False: socketserver closes the connection


def open_shared_listener(host: str, port: int, processes: int, backlog: int = LISTEN_BACKLOG,
                         bind_wait_s: float = 10.0) -> SharedListener:
    """Bind and listen on ``host:port`` (non-blocking) for ``processes`` SCP processes.

    A port still held for a moment by the receiving children of a node that was just killed is
    retried for up to ``bind_wait_s`` (they die with their parent, but not in the same instant)."""
    info = socket.getaddrinfo(host or None, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)[0]
    deadline = time.monotonic() + bind_wait_s
    while True:
        sock = socket.socket(info[0], socket.SOCK_STREAM)
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.bind(info[4])
            sock.listen(backlog)
            sock.setblocking(False)  # several processes accept: the losers must get EAGAIN, not block
            break
        except OSError as exc:
            sock.close()
            if exc.errno != errno.EADDRINUSE or time.monotonic() > deadline:
                raise
            time.sleep(0.2)
    loads = multiprocessing.get_context("spawn").RawArray("i", max(1, processes))
    return SharedListener(sock, loads)


def balanced_server_class(listener: SharedListener) -> type[NodeAssociationServer]:
    """A pynetdicom server class that serves ``listener`` (for ``AE.make_server(server_class=...)``)."""

    class BalancedAssociationServer(NodeAssociationServer):
        shared = listener

        def server_bind(self) -> None:
            self.socket.close()  # the fresh socket socketserver made: use the shared one instead
            self.socket = self.shared.sock
            self.server_address = self.socket.getsockname()
            self._open = 0
            self._open_lock = threading.Lock()
            self._waiting_since: float | None = None
            self.shared.loads[self.shared.index] = 0  # a restarted process starts with a clean slot

        def server_activate(self) -> None:
            pass  # already listening

        def server_close(self) -> None:
            self.socket.close()  # no shutdown(): that would stop the other processes' accepts too

        def _publish(self, delta: int) -> None:
            with self._open_lock:
                self._open = max(0, self._open + delta)
                self.shared.loads[self.shared.index] = self._open

        def connection_closed(self) -> None:
            """Call once per accepted connection when it closes (the SCP's EVT_CONN_CLOSE)."""
            self._publish(-1)

        def _my_turn(self) -> bool:
            loads, me = self.shared.loads, self.shared.index
            others = [loads[i] for i in range(len(loads)) if i != me]
            return not others or loads[me] <= min(others)

        def get_request(self) -> tuple[socket.socket, Any]:
            now = time.monotonic()
            if self._waiting_since is None:
                self._waiting_since = now
            if not self._my_turn() and now - self._waiting_since < ACCEPT_YIELD_S:
                time.sleep(_POLL_S)  # a less busy process will take it; look again
                # socketserver takes an OSError from get_request as "nothing accepted"
                raise BlockingIOError(errno.EAGAIN, "left to a less busy SCP process")
            self._waiting_since = None
            request = super().get_request()  # accept() raises EAGAIN if another process was faster
            self._publish(+1)
            return request

        def verify_request(self, request: Any, client_address: Any) -> bool:
            if super().verify_request(request, client_address):
                return True
            self._publish(-1)  # closed here: no association, so no EVT_CONN_CLOSE will count it off
            return False

    return BalancedAssociationServer
