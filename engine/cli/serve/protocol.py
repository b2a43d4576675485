"""uvicorn's HTTP/1.1 protocol (h11) with a deadline for each request's head.

uvicorn waits for ever for the first request on a new connection, and a client that
trickles a header byte every few seconds resets its keep-alive timer: a few hundred such
clients (slow loris) hold every connection the process can open. Here a client has
`head_timeout` seconds from opening the connection, or from the end of the previous
response on it, to send a whole request head; after that it gets 408 and the connection
is closed. (The body has its own deadline, in app.BodyLimit.)
"""
from __future__ import annotations

import json

from uvicorn.protocols.http.h11_impl import H11Protocol

from engine.cli.serve.app import DEFAULT_TIMEOUT, ApiError


def _timeout_response(seconds: float) -> bytes:
    late = ApiError(408, f"the request head did not arrive within {seconds:g} s", code="request_timeout")
    body = json.dumps(late.body()).encode()
    return (b"HTTP/1.1 408 Request Timeout\r\ncontent-type: application/json\r\n"
            b"content-length: " + str(len(body)).encode() + b"\r\nconnection: close\r\n\r\n" + body)


class HeadDeadlineProtocol(H11Protocol):
    head_timeout = DEFAULT_TIMEOUT

    def connection_made(self, transport):
        self._head_timer = None
        super().connection_made(transport)
        self._arm(None)

    def _arm(self, cycle):
        """Start the deadline for the request after `cycle` (None: the first one)."""
        self._disarm()
        self._head_timer = self.loop.call_later(self.head_timeout, self._expire, cycle)

    def _disarm(self):
        if self._head_timer is not None:
            self._head_timer.cancel()
            self._head_timer = None

    def _expire(self, cycle):
        self._head_timer = None
        # a new request began since the deadline was set: its head arrived in time
        if self.cycle is not cycle or self.transport.is_closing():
            return
        self.transport.write(_timeout_response(self.head_timeout))
        self.transport.close()

    def on_response_complete(self):
        done = self.cycle  # (the parent may start a pipelined request before returning)
        super().on_response_complete()
        if not self.transport.is_closing():
            self._arm(done)

    def connection_lost(self, exc):
        self._disarm()
        super().connection_lost(exc)


def with_timeout(seconds: float) -> type:
    """The protocol class with a head deadline of `seconds`."""
    return type("HeadDeadlineProtocol", (HeadDeadlineProtocol,), {"head_timeout": float(seconds)})
