"""Serving the app: uvicorn with a bounded request parser, read and send timeouts, and a graceful drain.

Each piece answers an attack or a failure seen against the plain `uvicorn.run` (issue 17):
- httptools accepts headers of any size at a cost that grows quadratically, so requests are parsed
  by h11 with a limit (ECHO_MAX_HEADER_BYTES; larger is 431);
- a client that connects and never completes its request line and headers (slowloris) is answered
  408 and closed ECHO_READ_TIMEOUT after it connected or began the request (bodies are timed where
  the app reads them, in observability.BodySizeLimit); a request answered before its body was read
  (a 404, a 405, a 413 by Content-Length) has ECHO_READ_TIMEOUT after its answer to send the rest,
  or is closed: uvicorn's keep-alive timer stops at any byte, so a byte now and then held it forever;
- a client that stops reading holds its connection and its stream forever: a connection whose send
  buffer stays full for ECHO_SEND_TIMEOUT is aborted, which the app sees as a disconnect; a
  WebSocket answers only its latest ping meanwhile, once the client reads (pongs would pile up in
  memory), and its messages are not compressed (a small compressed message could inflate to the size
  limit on the event loop);
- on SIGTERM, WebSocket sessions drain as HTTP streams do: `Drain` tells the app to take nothing new
  and finish what is in flight, then, when ECHO_SHUTDOWN_GRACE is over, to stop and say why;
  HTTP responses still running then are cut with one log line each.
"""

from __future__ import annotations

import asyncio
import logging
import socket
import struct
import sys
import uuid
from collections.abc import Callable

import h11
import uvicorn
from starlette.responses import Response
from uvicorn.protocols.http.h11_impl import STATUS_PHRASES, H11Protocol
from uvicorn.protocols.websockets.websockets_sansio_impl import WebSocketsSansIOProtocol

from errors import RequestError
from observability import REQUEST_ID_HEADER, error_response, handshake_denied, read_timed_out, stream_cut
from settings import Settings

log = logging.getLogger("echo_tts.http")
# after the grace: time for sockets to send their last `end` and close before uvicorn cancels the rest
CUT_WRAP_UP_S = 3.0
INCOMPLETE_RESPONSE = "ASGI callable returned without completing response."  # uvicorn's line (h11_impl)
INCOMPLETE_HANDSHAKE = "ASGI callable returned without completing handshake."  # (its WebSocket protocols)


class Drain:
    """The server's shutdown as the app sees it. `started`: SIGTERM arrived; take nothing new and
    finish what is in flight. `over`: the grace is over; stop now and say why. `watch(callback)`
    calls the callback on the event loop at each change (and at once if the drain has started)."""

    def __init__(self):
        self.started = self.over = False
        self._watchers: set[Callable[[], None]] = set()

    def watch(self, callback: Callable[[], None]) -> Callable[[], None]:
        """Subscribe `callback`; returns the function that unsubscribes it."""
        self._watchers.add(callback)
        if self.started:
            callback()
        return lambda: self._watchers.discard(callback)

    def start(self) -> None:
        self.started = True
        self._notify()

    def end(self) -> None:
        self.started = self.over = True
        self._notify()

    def _notify(self) -> None:
        for callback in list(self._watchers):
            callback()


class Config(uvicorn.Config):
    """uvicorn's configuration plus the timeouts the protocols below enforce."""

    def __init__(self, app, read_timeout: float, send_timeout: float, **kwargs):
        super().__init__(app, **kwargs)
        self.read_timeout, self.send_timeout = read_timeout, send_timeout


if sys.platform == "linux":  # the bytes a socket's kernel send queue holds (SIOCOUTQ is TIOCOUTQ there)
    import fcntl
    import termios

    def _kernel_unsent(sock) -> int:
        try:
            return struct.unpack("i", fcntl.ioctl(sock.fileno(), termios.TIOCOUTQ, b"\0" * 4))[0]
        except (OSError, ValueError):
            return 0
else:
    def _kernel_unsent(sock) -> int:
        return 0  # (elsewhere only the transport's own buffer tells progress)


class _SendTimeout:
    """Aborts a connection whose transport stayed paused for writing (its buffer full) while the client
    took nothing for `send_timeout` seconds: a reset, so that neither the process nor the kernel
    keeps its buffer; the app sees a disconnect and its stream is cancelled. A client that takes some
    (the buffer shrank) starts the clock again."""

    _send_timer: asyncio.TimerHandle | None = None
    _send_buffered = 0  # bytes waiting in the transport when the timer was (re)armed

    def pause_writing(self) -> None:
        super().pause_writing()
        if self._send_timer is None:
            self._arm_send_timer()

    def _arm_send_timer(self) -> None:
        self._send_buffered = self._unsent()
        self._send_timer = self.loop.call_later(self.config.send_timeout, self._send_timed_out)

    def _unsent(self) -> int:
        """Bytes written and not yet taken by the client: the transport's buffer and the kernel's send
        queue. The kernel wakes the transport only once a third of a send buffer of up to 4 MiB is
        free, so a client may take megabytes while the transport's buffer does not move."""
        sock = self.transport.get_extra_info("socket")
        return self.transport.get_write_buffer_size() + (_kernel_unsent(sock) if sock is not None else 0)

    def resume_writing(self) -> None:
        self._stop_send_timer()
        super().resume_writing()

    def connection_lost(self, exc: Exception | None) -> None:
        self._stop_send_timer()
        super().connection_lost(exc)

    def _stop_send_timer(self) -> None:
        if self._send_timer is not None:
            self._send_timer.cancel()
            self._send_timer = None

    def _send_timed_out(self) -> None:
        self._send_timer = None
        if self._unsent() < self._send_buffered:  # it took some: a listener playing a
            self._arm_send_timer()  # large piece as it comes keeps the writes paused, and is no stalled client
            return
        log.info("a client took no data for %g s (ECHO_SEND_TIMEOUT): connection dropped", self.config.send_timeout)
        sock = self.transport.get_extra_info("socket")
        if sock is not None:  # reset the connection: the kernel drops its send buffer too
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        self.transport.abort()


class BoundedH11Protocol(_SendTimeout, H11Protocol):
    """uvicorn's h11 protocol (headers bounded by `h11_max_incomplete_event_size`, answered 431 when
    larger) with a read timeout: a connection must deliver a request line and headers within
    `read_timeout` of connecting or of the first byte of its next request; else it gets 408 (or,
    when it sent nothing, no answer) and is closed. A body the app answered without reading must be
    complete within `read_timeout` of the answer, or the connection is closed."""

    _read_timer: asyncio.TimerHandle | None = None
    _unread_timer: asyncio.TimerHandle | None = None  # while the rest of an answered request's body may come
    _unread_cycle = None  # that request's

    def connection_made(self, transport: asyncio.Transport) -> None:
        super().connection_made(transport)
        self._read_timer = self.loop.call_later(self.config.read_timeout, self._read_timed_out)

    def connection_lost(self, exc: Exception | None) -> None:
        self._stop_read_timer()
        self._stop_unread_timer()
        super().connection_lost(exc)

    def on_response_complete(self) -> None:
        super().on_response_complete()
        if self.conn.their_state is h11.SEND_BODY and not self.transport.is_closing():  # answered, body unread
            self._unread_timer = self.loop.call_later(self.config.read_timeout, self._unread_body_timed_out)
            self._unread_cycle = self.cycle

    def handle_websocket_upgrade(self, event: h11.Request) -> None:
        self._stop_unread_timer()  # (the transport is the socket's now)
        super().handle_websocket_upgrade(event)

    def _unread_body_timed_out(self) -> None:
        """The rest of a body the app answered without reading did not come in time: close."""
        self._unread_timer = self._unread_cycle = None
        if self.conn.their_state is h11.SEND_BODY and not self.transport.is_closing():
            log.info("the rest of an answered request's body did not come within %g s (ECHO_READ_TIMEOUT): "
                     "connection closed", self.config.read_timeout)
            self.transport.close()

    def _stop_unread_timer(self) -> None:
        if self._unread_timer is not None:
            self._unread_timer.cancel()
            self._unread_timer = self._unread_cycle = None

    def data_received(self, data: bytes) -> None:
        if self.conn.their_state is h11.IDLE:  # a request's line and headers are coming in
            if self._read_timer is None:  # the next request begins
                self._read_timer = self.loop.call_later(self.config.read_timeout, self._read_timed_out)
            if self._head_too_large(data):
                return
        super().data_received(data)
        if self.conn.their_state is not h11.IDLE:  # its headers are in (or it failed, or it upgraded)
            self._stop_read_timer()
        if self.conn.their_state is not h11.SEND_BODY or self.cycle is not self._unread_cycle:  # the rest came
            self._stop_unread_timer()

    def _stop_read_timer(self) -> None:
        if self._read_timer is not None:
            self._read_timer.cancel()
            self._read_timer = None

    def _read_timed_out(self) -> None:
        self._read_timer = None
        if self.conn.their_state is not h11.IDLE or self.transport.is_closing():
            return
        if self.conn.trailing_data[0]:  # part of a request came: say why it ends
            log.info("request headers incomplete after %g s (ECHO_READ_TIMEOUT): answered 408",
                     self.config.read_timeout)
            self._answer_and_close(read_timed_out(self.config.read_timeout))
        else:
            self.transport.close()

    def _head_too_large(self, data: bytes) -> bool:
        """Answer 431 and close when the request line and headers, as far as they have come, pass
        the limit. (h11's own limit only counts what is buffered between reads: a larger head that
        arrives in one read would pass it.)"""
        limit = self.config.h11_max_incomplete_event_size
        head = bytes(self.conn.trailing_data[0]) + data  # what is buffered is at most `limit` bytes
        end = head.find(b"\r\n\r\n")
        if (end + 4 if end >= 0 else len(head)) <= limit:
            return False
        self._answer_431()
        return True

    def send_400_response(self, msg: str) -> None:
        """h11 refused the request: 431 when it was refused for its size, else uvicorn's 400."""
        if len(self.conn.trailing_data[0]) <= self.config.h11_max_incomplete_event_size:
            return super().send_400_response(msg)
        self._answer_431()

    def _answer_431(self) -> None:
        limit = self.config.h11_max_incomplete_event_size
        error = RequestError(f"the request line and headers are larger than {limit} bytes (ECHO_MAX_HEADER_BYTES)",
                             status=431)
        self._stop_read_timer()
        self._answer_and_close(error_response(error, close=True))

    def _answer_and_close(self, response: Response) -> None:
        """Write a whole response before any request was taken, then close the connection. It has an
        X-Request-ID of its own, as every response of the app does (no request reached the app)."""
        headers = [*self.server_state.default_headers, *response.raw_headers,
                   (REQUEST_ID_HEADER.encode(), uuid.uuid4().hex.encode())]
        try:
            for event in (h11.Response(status_code=response.status_code, headers=headers,
                                       reason=STATUS_PHRASES[response.status_code]),
                          h11.Data(data=response.body), h11.EndOfMessage()):
                self.transport.write(self.conn.send(event))
        except h11.LocalProtocolError:  # a response had begun after all: closing says enough
            pass
        self.transport.close()

    def cut(self) -> None:
        """The shutdown grace is over: end a response still running (one log line, no traceback)."""
        if self.cycle is not None and not self.cycle.response_complete and not self.transport.is_closing():
            log.warning("%s %s still running when the shutdown grace ended (ECHO_SHUTDOWN_GRACE): connection closed",
                        self.scope["method"], self.scope["path"])
            self.transport.abort()


class DrainingWebSocketProtocol(_SendTimeout, WebSocketsSansIOProtocol):
    """uvicorn's WebSocket protocol, except that:
    - shutdown leaves an open socket to the app, which drains it (Drain) and closes it; sockets still
      in their handshake are refused as before;
    - while the client takes nothing (its send buffer full) pongs wait, only those of the latest
      read that held pings (RFC 6455 allows answering the latest ping only): uvicorn wrote one for
      every ping at once, so a client flooding pings and reading none grew the server's memory by the
      size of its pings (858 MB in 30 s) until the send timeout. They go out once the client reads
      again (a slow reader's keepalive stays answered), or before a close reply that came with them."""

    _write_paused = False
    _held: list[bytes] | None = None  # the pongs of the latest read with pings, while writing is paused

    def pause_writing(self) -> None:
        super().pause_writing()
        self._write_paused = True

    def resume_writing(self) -> None:
        self._write_paused = False
        self._write_held()
        super().resume_writing()

    def handle_ping(self) -> None:
        reply = self.conn.data_to_send()  # (empty for the later pings of one read: the first took every pong)
        if self._write_paused:
            if reply:
                self._held = reply
        else:
            self._write_held()
            self.transport.write(b"".join(reply))

    def handle_close(self, event) -> None:
        self._write_held()  # (a close that came in the same read as a held ping: its reply goes after)
        super().handle_close(event)

    def _write_held(self) -> None:
        held, self._held = self._held, None
        if held is not None and not self.transport.is_closing():
            self.transport.write(b"".join(held))

    def shutdown(self) -> None:
        if self.handshake_complete and not self.close_sent and not self.disconnected:
            return
        super().shutdown()


class Server(uvicorn.Server):
    """uvicorn's server whose shutdown starts the app's Drain, and ends it when the grace is over,
    cutting the HTTP responses still running; uvicorn cancels what remains CUT_WRAP_UP_S later."""

    def __init__(self, config: Config, drain: Drain, grace: float):
        super().__init__(config)
        self.drain, self.grace = drain, grace

    async def shutdown(self, sockets=None) -> None:
        self.drain.start()
        cut = asyncio.get_running_loop().call_later(self.grace, self._grace_over)
        try:
            await super().shutdown(sockets)
        finally:
            cut.cancel()

    def _grace_over(self) -> None:
        self.drain.end()
        for connection in list(self.server_state.connections):
            if isinstance(connection, BoundedH11Protocol):
                connection.cut()


def _not_a_cut_stream(record: logging.LogRecord) -> bool:
    """uvicorn's error for a response the app left incomplete on purpose (observability.StreamCut,
    whose cause the app logged) is left out, and its error for a WebSocket handshake the app refused
    with an HTTP answer (a 401: uvicorn's sans-io protocol logs every denial response so); every
    other line passes."""
    return not ((stream_cut.get() and record.msg == INCOMPLETE_RESPONSE)
                or (handshake_denied.get() and record.msg == INCOMPLETE_HANDSHAKE))


def serve(app, settings: Settings, drain: Drain) -> None:
    """Serve `app` on ECHO_HOST:PORT until SIGTERM or SIGINT, then drain for ECHO_SHUTDOWN_GRACE."""
    logging.getLogger("uvicorn.error").addFilter(_not_a_cut_stream)
    config = Config(app, read_timeout=settings.read_timeout, send_timeout=settings.send_timeout,
                    host=settings.host, port=settings.port, log_config=None,
                    http=BoundedH11Protocol, ws=DrainingWebSocketProtocol,
                    h11_max_incomplete_event_size=settings.max_header_bytes,
                    timeout_graceful_shutdown=settings.shutdown_grace + CUT_WRAP_UP_S,
                    # no per-message compression: a 29 KB compressed message inflated to 30 MB on the event loop
                    # (every stream stalled), and audio gains ~13% from it for 3 ms of the loop a second
                    ws_per_message_deflate=False,
                    ws_max_size=2 * settings.max_body_bytes)  # speech_socket answers messages over the limit
    server = Server(config, drain, settings.shutdown_grace)
    server.run()
    if not server.started:
        raise SystemExit(1)  # start-up failed (uvicorn logged why)
