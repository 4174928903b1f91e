"""gunicorn's threaded worker, hardened against slow clients (slowloris).

The stock ``gthread`` worker hands a connection to a thread as soon as its first bytes arrive, and that
thread then blocks until the request's headers and body are in: 33 sockets sending half a request line
each held all 32 threads of a worker, and ``/healthz`` stopped answering. Here:

- the request *headers* are gathered by the worker's event loop, without a thread: a connection gets a
  thread only once its headers are complete (``\\r\\n\\r\\n``), or it is closed when they are not within
  :data:`HEADER_TIMEOUT_S` of its first byte being awaited (new and kept-alive connections alike), or
  when they grow past :data:`MAX_HEADER_BYTES` (the parser then answers 400);
- the *body* is read by the thread under a deadline, :data:`BODY_TIMEOUT_S` plus the declared
  ``Content-Length`` at :data:`MIN_BODY_RATE` bytes per second: a client slower than that is cut off
  (the application sees a disconnect, 400) and the connection closed;
- a response is written with a send timeout, so a client that never reads cannot hold a thread either.

Idle slow sockets then cost a file descriptor and a selector entry each, up to gunicorn's
``worker_connections`` (1000), and never a thread."""

from __future__ import annotations

import contextlib
import errno
import re
import socket
import time
from collections import deque
from functools import partial
from typing import Any

from gunicorn.workers.gthread import ThreadWorker

HEADER_TIMEOUT_S = 10.0
MAX_HEADER_BYTES = 64 * 1024
BODY_TIMEOUT_S = 10.0
MIN_BODY_RATE = 64 * 1024  # bytes per second, averaged over the whole body
SEND_TIMEOUT_S = 30.0
_LENGTH = re.compile(rb"\r\ncontent-length[ \t]*:[ \t]*(\d{1,15})", re.IGNORECASE)


class _DeadlineSocket:
    """The socket as the request parser reads it: every ``recv`` waits at most until ``deadline``; past
    it the read answers end-of-stream (``expired`` set), which the parser and Werkzeug treat as a client
    that went away."""

    def __init__(self, sock: socket.socket, deadline: float) -> None:
        self.sock, self.deadline, self.expired = sock, deadline, False

    def recv(self, size: int) -> bytes:
        remaining = self.deadline - time.monotonic()
        if remaining <= 0:
            self.expired = True
            return b""
        self.sock.settimeout(remaining)
        try:
            return self.sock.recv(size)
        except TimeoutError:
            self.expired = True
            return b""
        finally:
            self.sock.settimeout(SEND_TIMEOUT_S)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.sock, name)


class ThaliThreadWorker(ThreadWorker):
    """``gthread`` with request headers gathered in the event loop and deadlines on the rest."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.gathering: deque[Any] = deque()  # connections whose headers are not complete, by deadline

    # -- the event loop: headers ----------------------------------------------------------------
    def accept(self, listener: Any) -> None:
        from gunicorn.workers.gthread import TConn

        try:
            client, address = listener.accept()
        except OSError as exc:
            if exc.errno not in (errno.EAGAIN, errno.ECONNABORTED, errno.EWOULDBLOCK):
                raise
            return
        self.nr_conns += 1
        self._gather(TConn(self.cfg, client, address, listener.getsockname()))

    def on_client_socket_readable(self, conn: Any, client: Any) -> None:
        """A kept-alive connection sends its next request: its headers are gathered like a new one's."""
        self.poller.unregister(client)
        self.keepalived_conns.remove(conn)
        self._gather(conn)

    def _gather(self, conn: Any) -> None:
        conn.sock.setblocking(False)
        conn.head = bytearray()
        conn.head_deadline = time.monotonic() + HEADER_TIMEOUT_S
        self.gathering.append(conn)
        self.poller.register(conn.sock, 1, partial(self._on_head_bytes, conn))  # 1: EVENT_READ

    def _on_head_bytes(self, conn: Any, client: Any) -> None:
        try:
            data = conn.sock.recv(65536)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            data = b""
        if not data:  # the client went away before sending a request
            self._drop(conn)
            return
        conn.head += data
        if b"\r\n\r\n" not in conn.head and len(conn.head) <= MAX_HEADER_BYTES:
            return
        self.poller.unregister(conn.sock)
        self.gathering.remove(conn)
        conn.data_ready = True
        self.enqueue_req(conn)

    def _drop(self, conn: Any) -> None:
        with contextlib.suppress(KeyError, ValueError, OSError):
            self.poller.unregister(conn.sock)
        with contextlib.suppress(ValueError):
            self.gathering.remove(conn)
        self.nr_conns -= 1
        conn.close()

    def murder_pending(self) -> None:
        """Also close connections whose headers did not arrive in time (checked every second)."""
        super().murder_pending()
        now = time.monotonic()
        while self.gathering and self.gathering[0].head_deadline <= now:
            self._drop(self.gathering[0])

    # -- the thread: body -----------------------------------------------------------------------
    def handle(self, conn: Any) -> Any:
        head = bytes(getattr(conn, "head", None) or b"")
        conn.head = None
        guard = None
        if head or conn.initialized:
            conn.sock.setblocking(True)
            conn.init()  # the HTTP/1.1 parser (HTTP/2 is not enabled for thali serve)
            unreader = conn.parser.unreader
            if head:
                unreader.unread(head)
            else:  # a pipelined request, already in the parser's buffer
                head = unreader.buf.getvalue()[:MAX_HEADER_BYTES]
            match = _LENGTH.search(head)
            length = int(match.group(1)) if match else 0
            raw = unreader.sock.sock if isinstance(unreader.sock, _DeadlineSocket) else unreader.sock
            guard = _DeadlineSocket(raw, time.monotonic() + BODY_TIMEOUT_S + length / MIN_BODY_RATE)
            unreader.sock = guard
        keep = super().handle(conn)
        if guard is not None and guard.expired:
            return False  # a client too slow for its deadline is not kept alive
        return keep

    def handle_request(self, req: Any, conn: Any) -> Any:
        conn.sock.settimeout(SEND_TIMEOUT_S)  # a client that never reads its answer lets the thread go
        return super().handle_request(req, conn)
