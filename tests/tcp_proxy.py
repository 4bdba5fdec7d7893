"""A loopback TCP proxy that counts the bytes it forwards and can cut the connection after N of
them (for interruption tests)."""

from __future__ import annotations

import contextlib
import socket
import threading


class CuttingProxy:
    """Forwards 127.0.0.1:<port> to ``target``; once ``cut_after`` client bytes (or
    ``cut_after_returned`` server bytes) have passed, every open connection is closed (once),
    as when a network link drops. ``forwarded`` and ``returned`` count the bytes each way."""

    def __init__(
        self, target_port: int, cut_after: int | None = None, cut_after_returned: int | None = None
    ) -> None:
        self.target_port = target_port
        self.cut_after = cut_after
        self.cut_after_returned = cut_after_returned
        self.forwarded = 0
        self.returned = 0
        self.cuts = 0
        self._lock = threading.Lock()
        self._sockets: list[socket.socket] = []
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.port = self._listener.getsockname()[1]
        self._stopped = False
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while not self._stopped:
            try:
                client, _ = self._listener.accept()
            except OSError:
                return
            upstream = socket.create_connection(("127.0.0.1", self.target_port))
            with self._lock:
                self._sockets += [client, upstream]
            threading.Thread(target=self._pump, args=(client, upstream, True), daemon=True).start()
            threading.Thread(target=self._pump, args=(upstream, client, False), daemon=True).start()

    def _pump(self, source: socket.socket, sink: socket.socket, from_client: bool) -> None:
        try:
            while data := source.recv(1 << 16):
                sink.sendall(data)
                with self._lock:
                    if from_client:
                        self.forwarded += len(data)
                        cut = self.cut_after is not None and self.forwarded >= self.cut_after
                    else:
                        self.returned += len(data)
                        limit = self.cut_after_returned
                        cut = limit is not None and self.returned >= limit
                if cut:
                    self.cut()
                    return
        except OSError:
            pass
        finally:
            for s in (source, sink):
                with contextlib.suppress(OSError):
                    s.shutdown(socket.SHUT_RDWR)

    def cut(self) -> None:
        with self._lock:
            self.cut_after = self.cut_after_returned = None  # only once
            self.cuts += 1
            sockets, self._sockets = self._sockets, []
        for s in sockets:
            try:
                s.shutdown(socket.SHUT_RDWR)
                s.close()
            except OSError:
                pass

    def close(self) -> None:
        self._stopped = True
        self._listener.close()
        self.cut()
