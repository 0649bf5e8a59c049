"""Moving a response body from one socket to another inside the kernel, for the chaos proxy.

The proxy used to copy every body through Python (``readinto`` a buffer, then ``sendall``): two copies
and a GIL round trip per MiB. In a benchmark whose proxy only adds latency, that copying capped the
clients on both sides of a comparison at the proxy's own speed (about 150 MB/s on two shared cores),
so the benchmark measured the proxy. ``splice(2)`` moves the bytes socket -> pipe -> socket without
copying them to user space, one call per pipe-full, with the GIL released.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import select
import socket

__all__ = ["SPLICE", "Splicer"]

SPLICE = hasattr(os, "splice")
_PIPE_BYTES = 1 << 20  # the default limit for unprivileged processes (/proc/sys/fs/pipe-max-size)


class Splicer:
    """A pipe, reused for every body relayed on one connection (close it with :meth:`close`)."""

    def __init__(self) -> None:
        self._r, self._w = os.pipe()
        self.capacity = 64 * 1024  # Linux's default pipe size
        with contextlib.suppress(OSError, AttributeError):
            self.capacity = fcntl.fcntl(self._w, fcntl.F_SETPIPE_SZ, _PIPE_BYTES)

    def relay(self, src: socket.socket, dst: socket.socket, nbytes: int) -> None:
        """Move exactly ``nbytes`` from ``src`` to ``dst``, honouring each socket's timeout.

        Raises:
            ConnectionError: ``src`` closed before ``nbytes`` arrived. TimeoutError: a socket stayed
            idle past its timeout. OSError: either side failed. After any error the pipe may hold
            bytes: close this splicer and the connections.
        """
        while nbytes > 0:
            moved = self._move(src.fileno(), self._w, min(nbytes, self.capacity), select.POLLIN, src.gettimeout())
            if moved == 0:
                raise ConnectionError(f"upstream closed with {nbytes} body bytes still to come")
            nbytes -= moved
            while moved > 0:
                moved -= self._move(self._r, dst.fileno(), moved, select.POLLOUT, dst.gettimeout())

    @staticmethod
    def _move(src: int, dst: int, count: int, event: int, timeout: float | None) -> int:
        """One ``splice``, waiting (up to ``timeout`` seconds) while the socket side would block."""
        sock_fd = src if event == select.POLLIN else dst
        while True:
            try:
                return os.splice(src, dst, count, flags=os.SPLICE_F_MOVE)  # not F_MORE: it corks the tail
            except BlockingIOError:
                # Sockets with a timeout are non-blocking underneath: wait for them like socket.recv does.
                poller = select.poll()
                poller.register(sock_fd, event)
                if not poller.poll(None if timeout is None else int(timeout * 1000)):
                    raise TimeoutError(f"socket idle for {timeout}s while relaying a body") from None

    def close(self) -> None:
        """Close the pipe."""
        os.close(self._r)
        os.close(self._w)
