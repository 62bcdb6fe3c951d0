"""The HTTP server process: bind the port (a busy one is a clear error), time out slow headers, log
access, run uvicorn."""

from __future__ import annotations

import json
import logging
import os
import socket
import sys
import time
from pathlib import Path
from typing import Any

from gptkit.errors import GptkitError, QuietExit
from gptkit.inference.base import Inference
from gptkit.serve.app import create_app
from gptkit.serve.middleware import access_log
from gptkit.serve.schemas import Limits
from gptkit.store.bundle import check_model_path

# The most bytes of request line and headers a request may send: h11's own limit (16 KiB),
# enforced for httptools too (which has none: 4 MB of headers were read and answered).
MAX_HEADER_BYTES = 16 * 1024
FILES_BESIDES_CONNECTIONS = 64  # the model's files, the listening socket, pipes, logs
OVER_CAPACITY_GRACE_S = 2.0  # a connection answered 503 on arrival is closed this much later


def _header_timeout_protocol(
    seconds: float,
    http: str = "auto",
    send_timeout: float = Limits.send_timeout_s,
    max_connections: int = Limits.max_connections,
) -> type:
    """uvicorn's HTTP/1.1 protocol, with a deadline for a request's headers: a client that
    opens a connection (or keeps one alive) and never finishes its headers is dropped, and one
    whose request line and headers pass ``MAX_HEADER_BYTES`` gets a 400. A client that stops
    reading its answer is dropped once the answer has waited ``send_timeout`` seconds for it
    (the connection's buffers full): it held its admission slot, and a shutdown, for ever.
    Past ``max_connections`` open connections, the one idle longest (no request under way: kept
    alive, or still sending its headers) is closed to make room; when none is idle, the new one
    gets a 503 and is closed (idle sockets no longer lock everyone out, /health included).

    ``auto`` is uvicorn's httptools protocol (a C parser: ~0.1 ms less server CPU per request,
    and less per streamed chunk, than h11; on a small machine that is a share of every first
    token), or its pure-Python h11 protocol where httptools is not installed."""
    base = _protocol_base(http)
    limits = {
        "header_timeout": seconds,
        "send_timeout": send_timeout,
        "max_connections": max_connections,
    }
    return type("HeaderTimeoutProtocol", (_HeaderLimits, base), limits)


class _HeaderLimits:
    """The header deadline and size limit, mixed into uvicorn's protocol class (``super()`` is
    the protocol's own method)."""

    header_timeout = Limits.header_timeout_s
    send_timeout = Limits.send_timeout_s
    max_connections = Limits.max_connections
    _idle_since = 0.0  # when its last answer ended (or it opened)
    _header_timer: Any = None
    _send_timer: Any = None
    _header_bytes = 0
    _host_headers = 0
    _refusal = ""  # why this protocol refused the request (uvicorn's 400 does not say)
    _over = False  # one connection too many: answered 503, its requests never parsed

    def connection_made(self, transport) -> None:
        super().connection_made(transport)  # type: ignore[misc]
        self._idle_since = self.loop.time()  # type: ignore[attr-defined]
        self._arm()
        if len(self.connections) > self.max_connections:  # type: ignore[attr-defined]
            self._make_room()

    def _idle(self) -> bool:
        cycle = self.cycle  # type: ignore[attr-defined]
        return cycle is None or cycle.response_complete

    def _make_room(self) -> None:
        """One connection too many: close the one idle longest, or refuse this one."""
        others = [
            c
            for c in self.connections  # type: ignore[attr-defined]
            if c is not self and c._idle() and not c.transport.is_closing()
        ]
        if others:
            min(others, key=lambda c: c._idle_since).transport.close()
            return
        # The answer goes before the request is read; what the client sends meanwhile is
        # read and dropped, and the socket closed only after a grace period: closed with
        # unread data, the connection is reset and the client never sees the 503.
        self._over = True
        self._disarm()
        self._send_error(
            b"503 Service Unavailable",
            f"{self.max_connections} connections are open, each with a request under way; "
            "try again shortly",
            "server_error",
            b"retry-after: 1\r\n",
            close=False,
        )
        if self.transport.can_write_eof():  # type: ignore[attr-defined]
            self.transport.write_eof()  # type: ignore[attr-defined]
        self.loop.call_later(OVER_CAPACITY_GRACE_S, self.transport.close)  # type: ignore[attr-defined]

    def data_received(self, data: bytes) -> None:
        if not self._over:
            super().data_received(data)  # type: ignore[misc]

    def _arm(self) -> None:
        self._disarm()
        self._header_timer = self.loop.call_later(self.header_timeout, self._headers_too_slow)  # type: ignore[attr-defined]

    def _disarm(self) -> None:
        if self._header_timer is not None:
            self._header_timer.cancel()
            self._header_timer = None

    def _headers_too_slow(self) -> None:
        self._header_timer = None
        if self._idle() and not self.transport.is_closing():  # type: ignore[attr-defined]
            self.transport.close()  # type: ignore[attr-defined]

    def handle_events(self) -> None:  # h11: the parser's events are read here
        before = self.cycle  # type: ignore[attr-defined]
        super().handle_events()  # type: ignore[misc]
        if self.cycle is not None and self.cycle is not before:  # type: ignore[attr-defined]
            self._disarm()  # the headers are in; the body has its own deadline

    def on_message_begin(self) -> None:  # httptools: a request's first byte
        super().on_message_begin()  # type: ignore[misc]
        self._header_bytes = 0
        self._host_headers = 0

    def on_url(self, url: bytes) -> None:  # httptools (h11 keeps its own count)
        self._count_header_bytes(len(url))
        super().on_url(url)  # type: ignore[misc]

    def on_header(self, name: bytes, value: bytes) -> None:
        self._count_header_bytes(len(name) + len(value) + 4)
        self._host_headers += name.lower() == b"host"
        super().on_header(name, value)  # type: ignore[misc]

    def _count_header_bytes(self, n: int) -> None:
        self._header_bytes += n
        if self._header_bytes > MAX_HEADER_BYTES:  # raised in the parser: uvicorn's 400
            self._refuse(f"request line and headers over {MAX_HEADER_BYTES} bytes")

    def on_headers_complete(self) -> None:  # httptools: the parser calls this
        # RFC 9112 3.2: an HTTP/1.1 request without a Host header, or any request with two, is
        # a 400 (h11 refuses both itself; httptools accepts them).
        version = self.parser.get_http_version()  # type: ignore[attr-defined]
        if self._host_headers > 1 or (self._host_headers == 0 and version == "1.1"):
            self._refuse("an HTTP/1.1 request needs exactly one Host header")
        super().on_headers_complete()  # type: ignore[misc]
        self._disarm()  # the headers are in; the body has its own deadline

    def on_response_complete(self) -> None:
        super().on_response_complete()  # type: ignore[misc]
        self._idle_since = self.loop.time()  # type: ignore[attr-defined]
        if not self.transport.is_closing():  # type: ignore[attr-defined]
            self._arm()  # a kept-alive connection: the next request's headers

    def pause_writing(self) -> None:  # the transport's buffer is full: the client is not reading
        super().pause_writing()  # type: ignore[misc]
        if self._send_timer is None:
            self._send_timer = self.loop.call_later(self.send_timeout, self._not_reading)  # type: ignore[attr-defined]

    def resume_writing(self) -> None:
        self._stop_send_timer()
        super().resume_writing()  # type: ignore[misc]

    def _stop_send_timer(self) -> None:
        if self._send_timer is not None:
            self._send_timer.cancel()
            self._send_timer = None

    def _not_reading(self) -> None:
        """Drop the connection: the answer is told its client left (a 499; the request's
        rows leave the batch and its slot is free)."""
        self._send_timer = None
        self.transport.abort()  # type: ignore[attr-defined]

    def connection_lost(self, exc) -> None:
        self._disarm()
        self._stop_send_timer()
        super().connection_lost(exc)  # type: ignore[misc]

    def _refuse(self, why: str) -> None:
        """Refuse the request being parsed (raised in the parser: a 400 saying ``why``)."""
        self._refusal = why
        raise ValueError(why)

    def send_400_response(self, msg: str) -> None:
        """A request the parser refuses (malformed, headers too long, Host missing): a 400 in
        OpenAI's error shape, as every other error (uvicorn's own is plain text), saying why
        where gptkit refused it."""
        why = self._refusal or "not a well-formed HTTP/1.1 request line and headers"
        self._send_error(
            b"400 Bad Request", f"malformed HTTP request: {why}", "invalid_request_error"
        )

    def _send_error(
        self, status: bytes, message: str, kind: str, headers: bytes = b"", close: bool = True
    ) -> None:
        """Answer ``status`` in OpenAI's error shape outside any request cycle (uvicorn's own
        answers are plain text), close the connection (unless told not to), and log it."""
        error = {"message": message, "type": kind, "param": None, "code": None}
        body = json.dumps({"error": error}).encode()
        head = [b"HTTP/1.1 %s\r\n" % status]
        for name, value in self.server_state.default_headers:  # type: ignore[attr-defined]
            head.append(b"%s: %s\r\n" % (name, value))  # server, date
        head.append(
            b"content-type: application/json\r\ncontent-length: %d\r\n%s"
            b"connection: close\r\n\r\n" % (len(body), headers)
        )
        self.transport.write(b"".join(head) + body)  # type: ignore[attr-defined]
        if close:
            self.transport.close()  # type: ignore[attr-defined]
        # One access-log line for it too (the method and path may be what was malformed).
        peer = self.transport.get_extra_info("peername") or ("-",)  # type: ignore[attr-defined]
        access_log.info('%s "- -" %s 0.000s (%s)', peer[0], status[:3].decode(), message)


def _protocol_base(http: str) -> type:
    """uvicorn's protocol class for ``http`` (``auto``: httptools if installed, else h11)."""
    if http in ("auto", "httptools"):
        try:
            from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

            return HttpToolsProtocol
        except ImportError:  # httptools is not installed
            if http == "httptools":
                raise GptkitError(
                    "httptools is not installed", "pip install 'gptkit[serve]'"
                ) from None
    from uvicorn.protocols.http.h11_impl import H11Protocol

    return H11Protocol


def bind(host: str, port: int) -> socket.socket:
    """A listening socket, or a GptkitError (exit 2) for a bad host or a busy port."""
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except socket.gaierror as exc:
        raise GptkitError(
            f"--host {host!r}: not an address this machine can bind ({exc.strerror})",
            "Use 127.0.0.1 (this machine only) or 0.0.0.0 (every interface).",
        ) from None
    family, kind, proto, _, address = infos[0]
    # proto=IPPROTO_TCP matters: asyncio turns Nagle's algorithm off (TCP_NODELAY) only for such
    # sockets. With it on, a streamed chunk written after the headers waited for the client's
    # delayed ACK: up to 40 ms on every first token of a kept-alive connection.
    sock = socket.socket(family, kind, proto)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind(address)
        sock.listen(2048)
    except OSError as exc:
        sock.close()
        what = "is in use" if exc.errno in (98, 48, 10048) else f"cannot be bound ({exc.strerror})"
        raise GptkitError(
            f"port {port} on {host} {what}",
            "Pick another with --port, or stop the process using it.",
        ) from None
    sock.setblocking(False)
    return sock


def _url_host(host: str) -> str:
    """``host`` as a URL writes it: an IPv6 address in brackets (RFC 3986), ``http://[::1]:8000``."""
    return f"[{host}]" if ":" in host and not host.startswith("[") else host


def _server_class() -> Any:
    import uvicorn

    class Server(uvicorn.Server):
        """uvicorn's server, saying when it has stopped (Ctrl-C, SIGTERM): the process then
        ends by the signal, with nothing else printed."""

        async def shutdown(self, sockets: list[socket.socket] | None = None) -> None:
            print("gptkit: stopping: no new requests; answers under way finish", file=sys.stderr)
            await super().shutdown(sockets)
            print("gptkit: server stopped", file=sys.stderr, flush=True)

    return Server


def _connection_cap(wanted: int) -> int:
    """``wanted`` open connections, if the process may hold that many files: its soft limit
    is raised towards the hard one (a common soft limit of 1024 made accept() fail before
    the cap was reached, and idle sockets were never closed to make room); else a cap that
    fits, said on stderr."""
    try:
        import resource
    except ImportError:  # not a Unix
        return wanted
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    needed = wanted + FILES_BESIDES_CONNECTIONS
    if soft != resource.RLIM_INFINITY and soft < needed:
        raised = needed if hard == resource.RLIM_INFINITY else min(needed, hard)
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (raised, hard))
            soft = raised
        except (ValueError, OSError):
            pass
    if soft != resource.RLIM_INFINITY and soft < needed:
        cap = max(1, soft - FILES_BESIDES_CONNECTIONS)
        print(
            f"gptkit: note: this process may open {soft} files: at most {cap} connections "
            f"(not --max-connections {wanted})",
            file=sys.stderr,
        )
        return cap
    return wanted


def serve(
    bundle_dir: str,  # an export bundle or a training run folder
    host: str = "127.0.0.1",
    port: int = 8000,
    limits: Limits | None = None,
    name: str | None = None,
    access: bool = True,
    threads: int | None = None,
) -> None:
    import uvicorn

    limits = limits or Limits()
    started = time.perf_counter()
    check_model_path(Path(bundle_dir))  # the path's own mistake first, then the port's
    sock = bind(host, port)  # before anything is printed: a busy port is a plain error
    # A bundle runs on onnxruntime (no torch in the process); a run folder on torch.
    # onnxruntime's threads neither spin nor take every core: the HTTP side needs a core too
    # (on 2 cores a spinning 2-thread session left the server at half its runtime's speed).
    threads = threads or max(1, (os.cpu_count() or 1) - 1)
    bundle = Inference.load(bundle_dir, threads=threads, spin=False)
    if bundle.manifest is None and name is None:  # a run: its spec names it
        from gptkit.store.rundir import RunDir

        name = RunDir.resolve(bundle_dir, announce=False).read_spec().name
    app = create_app(bundle, limits, name)
    if access:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("%(asctime)s %(message)s"))
        access_log.addHandler(handler)
        access_log.setLevel(logging.INFO)
    bound = sock.getsockname()[1]
    print(
        f"gptkit: serving {bundle_dir} on http://{_url_host(host)}:{bound} "
        f"(loaded in {time.perf_counter() - started:.2f}s)",
        flush=True,
    )
    config = uvicorn.Config(
        app,
        log_level="warning",
        timeout_keep_alive=5,
        http=_header_timeout_protocol(
            limits.header_timeout_s,
            send_timeout=limits.send_timeout_s,
            max_connections=_connection_cap(limits.max_connections),
        ),
        # SIGTERM: answers under way may finish for this long, then they are cancelled (it
        # waited for ever: for a client that stopped reading, as long as it stayed).
        timeout_graceful_shutdown=limits.shutdown_timeout_s,
    )
    try:
        _server_class()(config).run(sockets=[sock])
    except KeyboardInterrupt:  # uvicorn raises Ctrl-C again once stopped: already said
        raise QuietExit(130) from None
