"""The server's HTTP protocol (uvicorn's httptools parser, or h11 where httptools is missing),
with gptkit's header deadline, run by a real uvicorn on a real socket with a tiny ASGI app."""

import http.client
import json
import logging
import socket
import subprocess
import sys
import threading
import time

import pytest
import uvicorn

from gptkit.errors import GptkitError
from gptkit.serve.http import MAX_HEADER_BYTES, _header_timeout_protocol, _protocol_base, bind

DEADLINE = 0.5


async def _app(scope, receive, send):
    if scope["type"] != "http":
        return
    body = b""
    while True:
        message = await receive()
        body += message.get("body", b"")
        if not message.get("more_body"):
            break
    await send({"type": "http.response.start", "status": 200, "headers": []})
    await send({"type": "http.response.body", "body": b"got " + body})


@pytest.fixture(params=["httptools", "h11"])
def port(request):
    sock = bind("127.0.0.1", 0)
    config = uvicorn.Config(
        _app,
        log_level="warning",
        timeout_keep_alive=30,
        http=_header_timeout_protocol(DEADLINE, request.param),
    )
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        assert time.monotonic() < deadline, "uvicorn did not start"
        time.sleep(0.01)
    yield sock.getsockname()[1]
    server.should_exit = True
    thread.join(10)


def _dropped_within(s: socket.socket, seconds: float) -> bool:
    """Whether the server closes ``s`` within ``seconds`` (reading only)."""
    s.settimeout(seconds)
    try:
        return s.recv(4096) == b""
    except TimeoutError:
        return False


def test_auto_is_httptools_when_installed():
    pytest.importorskip("httptools")
    from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

    assert issubclass(_header_timeout_protocol(1.0), HttpToolsProtocol)
    assert _protocol_base("h11").__name__ == "H11Protocol"


def test_httptools_asked_for_but_missing_is_a_clear_error(monkeypatch):
    monkeypatch.setitem(sys.modules, "uvicorn.protocols.http.httptools_impl", None)
    with pytest.raises(GptkitError, match="httptools is not installed"):
        _protocol_base("httptools")
    assert _protocol_base("auto").__name__ == "H11Protocol"  # auto falls back


def test_kept_alive_requests_are_answered_and_unfinished_headers_dropped(port):
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    for i in range(3):  # one connection, several requests
        conn.request("POST", "/", body=f"request {i}".encode())
        response = conn.getresponse()
        assert (response.status, response.read()) == (200, f"got request {i}".encode())
        time.sleep(DEADLINE * 0.3)
    conn.close()

    with socket.create_connection(("127.0.0.1", port)) as s:  # headers begun, never finished
        s.sendall(b"POST / HTTP/1.1\r\nHost: x\r\n")
        assert _dropped_within(s, DEADLINE * 10)

    with socket.create_connection(("127.0.0.1", port)) as s:  # a second request's, ditto
        s.sendall(b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 2\r\n\r\nhi")
        s.settimeout(10)
        response = b""
        while not response.endswith(b"0\r\n\r\n"):  # the whole (chunked) response: its
            response += s.recv(4096)  # body may come in a second packet
        assert response.startswith(b"HTTP/1.1 200") and b"got hi" in response
        s.sendall(b"POST / HTTP/1.1\r\nHost: x\r\n")
        assert _dropped_within(s, DEADLINE * 10)


@pytest.mark.parametrize(
    "head",
    [
        b"POST / HTTP/1.1\r\nContent-Length: 2\r\n",  # HTTP/1.1 without Host
        b"POST / HTTP/1.1\r\nHost: a\r\nHost: b\r\nContent-Length: 2\r\n",  # two
    ],
)
def test_a_request_without_exactly_one_host_is_a_400(port, head, request, caplog):
    """RFC 9112 3.2, under either parser (httptools accepted both); HTTP/1.0 needs none. The
    parser's 400 has its access-log line too (it had none)."""
    caplog.set_level(logging.INFO, logger="gptkit.access")
    for message, status in ((head, b"400"), (b"POST / HTTP/1.0\r\nContent-Length: 2\r\n", b"200")):
        with socket.create_connection(("127.0.0.1", port)) as s:
            s.sendall(message + b"\r\nhi")
            s.settimeout(10)
            answer = b""
            while chunk := s.recv(4096):  # the server closes after a 400; read until then
                answer += chunk
                if status == b"200" and answer.endswith(b"0\r\n\r\n"):
                    break
            assert answer.startswith(b"HTTP/1.1 " + status)
            if status == b"400":  # in OpenAI's error shape, as every other error
                error = json.loads(answer.split(b"\r\n\r\n", 1)[1])["error"]
                assert error["type"] == "invalid_request_error" and error["message"]
                if request.node.callspec.params["port"] == "httptools":  # gptkit says why
                    assert "exactly one Host header" in error["message"]
                logged = [r.getMessage() for r in caplog.records if r.name == "gptkit.access"]
                assert any('"- -" 400' in m and "malformed HTTP" in m for m in logged), logged


def test_a_slow_body_is_not_cut_by_the_header_deadline(port):
    """The deadline is for headers only: a body may take longer (it has its own limit)."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    conn.putrequest("POST", "/")
    conn.putheader("Content-Length", "4")
    conn.endheaders(b"ab")
    time.sleep(DEADLINE * 2)
    conn.send(b"cd")
    response = conn.getresponse()
    assert (response.status, response.read()) == (200, b"got abcd")
    conn.close()


def test_idle_connections_are_not_answered_before_their_headers(port):
    """No response is made up for a connection that sent nothing (it is closed, not 400)."""
    with socket.create_connection(("127.0.0.1", port)) as s:
        assert _dropped_within(s, DEADLINE * 10)


def _reply(port: int, head: bytes) -> bytes:
    """What the server sends back to ``head`` (a request's line and headers, sent 4 KB at a
    time as a slow client would), until it closes the connection or goes quiet."""
    with socket.create_connection(("127.0.0.1", port)) as s:
        try:
            for i in range(0, len(head), 4096):
                s.sendall(head[i : i + 4096])
                time.sleep(0.005)
        except OSError:  # the server closed the connection while we sent
            pass
        s.settimeout(10)
        out = b""
        try:
            while part := s.recv(65536):
                out += part
                if b"\r\n\r\n" in out and out.startswith(b"HTTP/1.1 200"):
                    break
        except (TimeoutError, ConnectionResetError):
            pass
    return out


def test_headers_past_the_limit_get_a_400_under_both_parsers(port):
    """h11 caps a request's head at 16 KiB; httptools has no cap of its own: gptkit's is the
    same (a client could otherwise make the server hold megabytes per connection)."""
    filler = b"".join(b"X-Fill-%d: %s\r\n" % (i, b"a" * 1000) for i in range(64))  # ~66 KB
    big = _reply(port, b"POST / HTTP/1.1\r\nHost: x\r\n" + filler + b"Content-Length: 0\r\n\r\n")
    assert not big.startswith(b"HTTP/1.1 200")
    assert big == b"" or big.startswith(b"HTTP/1.1 400")
    fits = b"".join(b"X-Fill-%d: %s\r\n" % (i, b"a" * 1000) for i in range(8))  # ~8 KB
    assert MAX_HEADER_BYTES > len(fits) + 100
    ok = _reply(port, b"POST / HTTP/1.1\r\nHost: x\r\n" + fits + b"Content-Length: 0\r\n\r\n")
    assert ok.startswith(b"HTTP/1.1 200")


@pytest.mark.parametrize("parser", ["httptools", "h11"])
def test_idle_connections_make_room_and_busy_ones_get_a_503(parser, caplog):
    """Past ``max_connections`` the connection idle longest is closed, so idle sockets cannot
    lock everyone out (1024 of them made uvicorn answer every request, /health included, with
    a plain-text 503, unlogged); when all are busy, a new one gets a 503 in OpenAI's error
    shape with Retry-After, logged."""
    pytest.importorskip(parser)
    caplog.set_level(logging.INFO, logger="gptkit.access")
    sock = bind("127.0.0.1", 0)
    protocol = _header_timeout_protocol(30.0, parser, max_connections=3)
    server = uvicorn.Server(uvicorn.Config(_app, log_level="warning", http=protocol))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    while not server.started:
        time.sleep(0.01)
    port = sock.getsockname()[1]
    try:
        idle = []
        for _ in range(3):  # opened in this order: the first is idle longest
            idle.append(socket.create_connection(("127.0.0.1", port)))
            time.sleep(0.05)
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
        conn.request("POST", "/", body=b"hi")
        assert conn.getresponse().read() == b"got hi"  # answered: room was made
        assert _dropped_within(idle[0], 5)
        assert not _dropped_within(idle[2], 0.2)
        busy = []
        for _ in range(3):  # each with a request under way (its body not all sent)
            s = socket.create_connection(("127.0.0.1", port))
            s.sendall(b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 10\r\n\r\nhi")
            busy.append(s)
            time.sleep(0.1)
        with socket.create_connection(("127.0.0.1", port)) as s:  # a client sending a
            time.sleep(0.2)  # request as the answer comes: still read (closed with unread
            s.sendall(b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 2\r\n\r\nhi")  # data,
            s.settimeout(10)  # the connection was reset and the 503 lost)
            answer = b""
            while chunk := s.recv(4096):
                answer += chunk
        head, body = answer.split(b"\r\n\r\n", 1)
        assert head.startswith(b"HTTP/1.1 503") and b"retry-after: 1" in head.lower()
        assert json.loads(body)["error"]["message"].startswith("3 connections are open")
        assert any('"- -" 503' in r.getMessage() for r in caplog.records)
        for s in [*idle, *busy]:
            s.close()
        conn.close()
    finally:
        server.should_exit = True
        thread.join(10)


def test_the_connection_cap_fits_the_files_the_process_may_open():
    """A soft file limit of 1024 (a common default) made accept() fail before 1024
    connections, so idle ones were never closed to make room: the soft limit is raised
    towards the hard one, and a cap above even that is lowered, said on stderr."""
    pytest.importorskip("resource")
    code = (
        "import resource, sys\n"
        "from gptkit.serve.http import _connection_cap\n"
        "resource.setrlimit(resource.RLIMIT_NOFILE, (256, int(sys.argv[1])))\n"
        "print(_connection_cap(1024), resource.getrlimit(resource.RLIMIT_NOFILE)[0])\n"
    )
    run = [sys.executable, "-c", code]
    roomy = subprocess.run([*run, "4096"], capture_output=True, text=True, timeout=60)
    assert roomy.stdout.split() == ["1024", "1088"] and not roomy.stderr, roomy
    tight = subprocess.run([*run, "512"], capture_output=True, text=True, timeout=60)
    assert tight.stdout.split() == ["448", "512"], tight
    assert "at most 448 connections (not --max-connections 1024)" in tight.stderr
