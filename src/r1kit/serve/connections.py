"""The limits on a client's connection that uvicorn lacks: a deadline and a size for a request's headers.

uvicorn's httptools protocol waits for headers forever and keeps every header byte (llhttp sets no
size limit), so a client that opens connections and trickles header bytes ("slowloris") holds them,
and their memory, for as long as it likes. Here a request's headers must be complete within
``header_timeout`` seconds of their first byte (of the connection, for its first request) and within
``max_header_bytes``; otherwise the connection is closed. A slow *body* is the ASGI guard's affair
(``r1kit.serve.app``), a connection idle between requests uvicorn's ``timeout_keep_alive``.
"""

from __future__ import annotations

from asyncio import TimerHandle

from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol


class HeaderTooLarge(Exception):
    """Raised from a parser callback: uvicorn answers the parser error with a 400 and closes."""


class BoundedHttpProtocol(HttpToolsProtocol):
    """uvicorn's httptools protocol with a header deadline and a header size limit (see the module)."""

    header_timeout: float = 10.0
    max_header_bytes: int = 64 << 10

    _deadline: TimerHandle | None = None
    _header_bytes = 0

    def connection_made(self, transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._arm()

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm()
        super().connection_lost(exc)

    def on_message_begin(self) -> None:
        super().on_message_begin()
        self._header_bytes = 0
        if self._deadline is None:
            self._arm()

    def on_url(self, url: bytes) -> None:
        self._count(len(url))
        super().on_url(url)

    def on_header(self, name: bytes, value: bytes) -> None:
        self._count(len(name) + len(value))
        super().on_header(name, value)

    def on_headers_complete(self) -> None:
        self._disarm()
        super().on_headers_complete()

    def _count(self, n: int) -> None:
        self._header_bytes += n
        if self._header_bytes > self.max_header_bytes:
            raise HeaderTooLarge(f"request headers are over {self.max_header_bytes} bytes")

    def _arm(self) -> None:
        self._deadline = self.loop.call_later(self.header_timeout, self._expire)

    def _disarm(self) -> None:
        if self._deadline is not None:
            self._deadline.cancel()
            self._deadline = None

    def _expire(self) -> None:
        self._deadline = None
        self.transport.close()


def bounded_protocol(header_timeout: float, max_header_bytes: int) -> type[BoundedHttpProtocol]:
    """The protocol class for ``uvicorn.Config(http=...)``, with these limits."""
    return type("BoundedHttpProtocol", (BoundedHttpProtocol,), {"header_timeout": header_timeout, "max_header_bytes": max_header_bytes})
