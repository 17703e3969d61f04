"""uvicorn's httptools protocol with a deadline on each request's head.

uvicorn closes a connection idle between requests (`timeout_keep_alive`) but not one that opens and sends nothing,
or sends its request line and headers a byte at a time (slowloris), and any byte (a blank line, the rest of a body
the answer did not wait for) restarts its idle timer: such connections would stay open for ever, each holding a
socket. Here each head must be complete within `header_timeout` seconds of the connection opening or of the previous
answer's end, whatever bytes arrive meanwhile; then the connection gets a 408 and is closed. While a request is
being answered its body has its own bound (`BoundedBody`: the request's time).
"""

from __future__ import annotations

import asyncio

from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

HEAD_TIMEOUT_RESPONSE = (b"HTTP/1.1 408 Request Timeout\r\ncontent-type: text/plain; charset=utf-8\r\n"
                         b"content-length: 38\r\nconnection: close\r\n\r\nrequest headers not received in time\r\n")


def with_header_deadline(header_timeout: float) -> type[asyncio.Protocol]:
    """The protocol class to give uvicorn (`uvicorn.Config(http=...)`)."""

    class HeaderDeadlineProtocol(HttpToolsProtocol):
        _head_deadline: asyncio.TimerHandle | None = None

        def _arm(self) -> None:
            if self._head_deadline is None:
                self._head_deadline = self.loop.call_later(header_timeout, self._head_too_slow)

        def _disarm(self) -> None:
            if self._head_deadline is not None:
                self._head_deadline.cancel()
                self._head_deadline = None

        def _head_too_slow(self) -> None:
            self._head_deadline = None
            if not self.transport.is_closing():
                self.transport.write(HEAD_TIMEOUT_RESPONSE)
                self.transport.close()

        def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
            super().connection_made(transport)
            self._arm()

        def on_message_begin(self) -> None:  # a pipelined request after one still being answered
            super().on_message_begin()
            self._arm()

        def on_response_complete(self) -> None:
            next_head_received = bool(self.pipeline)  # a pipelined request whose head is in: it is answered next
            super().on_response_complete()
            if not next_head_received:
                self._arm()

        def on_headers_complete(self) -> None:
            self._disarm()
            super().on_headers_complete()

        def connection_lost(self, exc: Exception | None) -> None:
            self._disarm()
            super().connection_lost(exc)

    return HeaderDeadlineProtocol
