"""The HTTP server, run for real as `gptkit serve` and hit over a socket; and its decode
scheduler, driven directly with a real bundle and asyncio loop."""

import asyncio
import json
import logging
import re
import signal
import socket
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx
import pytest

from gptkit.inference.decoding import GenerationOptions
from gptkit.serve.schemas import Limits
from tests.helpers import assert_user_error, run_cli
from tests.mlflow_server import free_port

pytestmark = pytest.mark.slow  # a real server in a subprocess, or a real exported bundle


@pytest.fixture(scope="module")
def bundle(smoke_bundle):
    return smoke_bundle


@pytest.fixture(scope="module")
def server(bundle, tmp_path_factory):
    port = free_port()
    started = time.perf_counter()
    # The access log goes to a file: a pipe nobody reads would fill up and stall the server.
    log = tmp_path_factory.mktemp("serve-log") / "stderr.txt"
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "gptkit",
            "serve",
            str(bundle),
            "--port",
            str(port),
            "--max-concurrent",
            "4",
            "--max-queued",
            "8",
            "--max-tokens",
            "64",
            "--body-timeout",
            "2",
            "--header-timeout",
            "2",
            "--served-model-name",
            "shakespeare",
            "--stream-interval",
            "0",  # every decode step: the streaming tests see token-sized chunks
        ],
        stdout=subprocess.PIPE,
        stderr=open(log, "w"),
        text=True,
    )
    url = _wait_for(proc, port, log)
    yield {
        "url": url,
        "proc": proc,
        "startup_s": time.perf_counter() - started,
        "log": log,
        "bundle": bundle,
    }
    proc.terminate()
    proc.wait(timeout=30)


def _wait_for(proc: subprocess.Popen, port: int, log: Path) -> str:
    """The server's URL once /health answers (the log in the error if it never does)."""
    url = f"http://127.0.0.1:{port}"
    for _ in range(300):
        try:
            if httpx.get(url + "/health", timeout=1).status_code == 200:
                return url
        except httpx.HTTPError:
            time.sleep(0.1)
    proc.kill()
    raise AssertionError(log.read_text())


def test_health_models_and_no_torch_in_the_process(server):
    assert httpx.get(server["url"] + "/health").json()["status"] == "ok"
    models = httpx.get(server["url"] + "/v1/models").json()
    assert models["data"][0]["id"] == "shakespeare" and models["data"][0]["max_seq_len"] == 32
    maps = open(f"/proc/{server['proc'].pid}/maps").read()
    assert "libtorch" not in maps and "onnxruntime" in maps


def test_a_served_name_with_a_slash_is_retrieved_and_described_in_the_schema(bundle):
    """GET /v1/models/{id} takes an id with '/' (as Hugging Face names are), whole or
    percent-encoded as the openai client sends it; /openapi.json gives the model card's schema
    and, for this GET, only the errors it can answer."""
    from starlette.testclient import TestClient

    import gptkit
    from gptkit.serve.app import create_app

    app = create_app(gptkit.load(bundle), name="org/tiny-shakespeare")
    with TestClient(app) as client:
        for path in ("org/tiny-shakespeare", "org%2Ftiny-shakespeare"):
            card = client.get(f"/v1/models/{path}")
            assert card.status_code == 200 and card.json()["id"] == "org/tiny-shakespeare"
        assert set(card.json()) == {
            "id", "object", "created", "owned_by", "max_seq_len", "vocab_size", "precision"
        }  # fmt: skip
        other = client.get("/v1/models/org/other")
        assert other.status_code == 404 and other.json()["error"]["code"] == "model_not_found"
        schema = client.get("/openapi.json").json()
    get = schema["paths"]["/v1/models/{model_id}"]["get"]
    assert sorted(get["responses"]) == ["200", "404", "500"]
    assert get["responses"]["200"]["content"]["application/json"]["schema"] == {
        "$ref": "#/components/schemas/ModelCard"
    }


def test_completion_seeded_and_repeatable(server):
    body = {"prompt": "ROMEO:", "max_tokens": 20, "seed": 7, "temperature": 0.8, "top_k": 10}
    a = httpx.post(server["url"] + "/v1/completions", json=body).json()
    b = httpx.post(server["url"] + "/v1/completions", json=body).json()
    assert a["choices"][0]["text"] == b["choices"][0]["text"]
    assert a["object"] == "text_completion" and a["usage"]["prompt_tokens"] == 6
    assert a["choices"][0]["finish_reason"] in ("length", "stop")


def test_list_of_prompts_and_n(server):
    r = httpx.post(
        server["url"] + "/v1/completions",
        json={"prompt": ["A", "BB"], "n": 2, "max_tokens": 5, "seed": 1, "echo": True},
    ).json()
    assert [c["index"] for c in r["choices"]] == [0, 1, 2, 3]
    # Choice i*n + j answers prompt i: with echo, its text starts with that prompt.
    texts = [c["text"] for c in r["choices"]]
    assert [t[0] for t in texts] == ["A", "A", "B", "B"], texts
    assert texts[2].startswith("BB") and texts[3].startswith("BB"), texts


def test_stop_string(server):
    body = {"prompt": "ROMEO:", "max_tokens": 40, "seed": 7, "temperature": 0.8}
    full = httpx.post(server["url"] + "/v1/completions", json=body).json()["choices"][0]["text"]
    # A stop string the seeded text reaches after at least one character.
    stop = next(c for c in full[1:] if full.index(c) > 0)
    r = httpx.post(server["url"] + "/v1/completions", json={**body, "stop": [stop]})
    choice = r.json()["choices"][0]
    assert choice["finish_reason"] == "stop", choice  # it stopped at the string, not the limit
    assert choice["text"] == full[: full.index(stop)] and choice["text"], (choice, full)


def test_streaming_server_sent_events(server):
    body = {"prompt": "ROMEO:", "max_tokens": 30, "seed": 3, "stream": True, "temperature": 0}
    pieces, ids, done = [], set(), False
    with httpx.stream("POST", server["url"] + "/v1/completions", json=body) as r:
        assert r.headers["content-type"].startswith("text/event-stream")
        assert r.headers["cache-control"] == "no-cache"  # and not held back by a proxy
        assert r.headers["x-accel-buffering"] == "no"
        for line in r.iter_lines():
            if not line.startswith("data: "):
                continue
            if line == "data: [DONE]":
                done = True
                break
            pieces.append(json.loads(line[6:])["choices"][0]["text"])
            ids.add(json.loads(line[6:])["id"])
    assert done and len(pieces) > 2
    whole = httpx.post(server["url"] + "/v1/completions", json={**body, "stream": False}).json()
    assert "".join(pieces) == whole["choices"][0]["text"]
    # One id for every chunk of a stream, OpenAI's shape, and another for each answer.
    others = [
        httpx.post(server["url"] + "/v1/completions", json={**body, "stream": False}).json()["id"]
        for _ in range(5)
    ]
    assert len(ids) == 1 and re.fullmatch(r"cmpl-[0-9a-f]{24}", ids.pop())
    assert len({whole["id"], *others}) == 6


@pytest.mark.parametrize(
    ("body", "status", "needle", "param"),
    [
        ({"prompt": "A", "max_tokens": 1000}, 400, "max_tokens: at most 64", "max_tokens"),
        ({"prompt": "A", "max_tokens": 1e300}, 400, "at most 64, got 1.000e+300", "max_tokens"),
        ({"prompt": "A", "max_tokens": 10**500}, 400, "got 1.000e+500", "max_tokens"),
        ({"prompt": "A", "top_p": 1.5}, 400, "top_p", "top_p"),
        ({"prompt": "A", "top_k": 40, "top_p": 0.5}, 400, "both truncate", "top_p"),
        ({"prompt": "A", "max_tokens": -1}, 400, "max_tokens", "max_tokens"),
        ({"max_tokens": 3}, 400, "prompt", "prompt"),
        ({"prompt": "x" * 40}, 400, "the model's context is 32", "prompt"),
        ({"prompt": "snow ☃"}, 400, "never saw", "prompt"),
        ({"prompt": [], "max_tokens": 3}, 400, "non-empty list", "prompt"),
        ({"prompt": "A", "n": 99}, 400, "n", "n"),
        ({"prompt": "A", "stop": ["a", "b", "c", "d", "e"]}, 400, "stop", "stop"),
        ({"prompt": "A", "best_of": 2}, 400, "best_of", "best_of"),
        ({"prompt": "A", "temprature": 0.5}, 400, "unknown parameter", "temprature"),
        ({"prompt": "A", "stream_options": {"x": 1}}, 400, "unknown", "stream_options.x"),
        ({"prompt": "A", "presence_penalty": 2.5}, 400, "presence_penalty", "presence_penalty"),
        ({"prompt": "A", "frequency_penalty": -3}, 400, "frequency_penalty", "frequency_penalty"),
        ({"prompt": "A", "logit_bias": {"five": 10}}, 400, "token ids", "logit_bias"),
        ({"prompt": "A", "suffix": "end"}, 400, "not supported", "suffix"),
        ({"prompt": "A", "logprobs": 6}, 400, "logprobs", "logprobs"),
        ({"prompt": "A", "tools": [{"type": "function"}]}, 400, "not supported", "tools"),
        ({"prompt": "A", "tool_choice": "auto"}, 400, "not supported", "tool_choice"),
        ({"prompt": "A", "functions": [{}]}, 400, "not supported", "functions"),
        ({"prompt": "A", "function_call": "auto"}, 400, "not supported", "function_call"),
        (
            {"prompt": "A", "response_format": {"type": "json_object"}},
            400,
            "not supported",
            "response_format",
        ),
    ],
)
def test_bad_requests_get_4xx_and_the_server_keeps_serving(server, body, status, needle, param):
    r = httpx.post(server["url"] + "/v1/completions", json=body)
    assert r.status_code == status, r.text
    assert needle in r.json()["error"]["message"]
    assert r.json()["error"]["param"] == param, r.text
    assert httpx.get(server["url"] + "/health").status_code == 200


def test_neutral_values_of_unsupported_fields_and_user_are_accepted(server):
    body = {
        "prompt": "A",
        "max_tokens": 2,
        "presence_penalty": 0,
        "frequency_penalty": 0.0,
        "logit_bias": {},
        "logprobs": 0,
        "best_of": 1,
        "response_format": {"type": "text"},
        "user": "someone",
    }
    r = httpx.post(server["url"] + "/v1/completions", json=body)
    assert r.status_code == 200, r.text


@pytest.mark.parametrize(
    ("body", "param"),
    [
        ({"messages": [{"role": "wizard", "content": "hi"}]}, "messages[0].role"),
        ({"messages": [{"role": "user", "content": "hi", "x": 1}]}, "messages[0].x"),
        ({"messages": [{"role": "user", "content": "hi"}], "temperature": "hot"}, "temperature"),
        (
            {"messages": [{"role": "user", "content": "hi"}], "logprobs": True, "top_logprobs": 21},
            "top_logprobs",
        ),
        ({"messages": [{"role": "user", "content": "hi"}], "top_logprobs": 2}, "top_logprobs"),
        ({"messages": [{"role": "user", "content": "hi"}], "tools": []}, "tools"),
        ({"messages": [{"role": "user", "content": "hi", "name": 7}]}, "messages[0].name"),
    ],
)
def test_chat_field_errors_are_400_naming_the_param(server, body, param):
    r = httpx.post(server["url"] + "/v1/chat/completions", json=body)
    assert r.status_code == 400, r.text
    assert r.json()["error"]["param"] == param, r.text


def test_malformed_json_and_oversized_body(server):
    r = httpx.post(
        server["url"] + "/v1/completions",
        content=b"{not json",
        headers={"content-type": "application/json"},
    )
    assert r.status_code == 400
    message = r.json()["error"]["message"]
    assert message.startswith("the request body is not valid JSON") and "character 1" in message
    big = httpx.post(
        server["url"] + "/v1/completions",
        content=b"x" * 200_000,
        headers={"content-type": "application/json"},
    )
    assert big.status_code == 413
    error = big.json()["error"]  # OpenAI's type for every refused request
    assert error["type"] == "invalid_request_error" and error["code"] == "request_too_large"


def test_bodies_that_are_not_utf8_or_hold_nan_say_so(server):
    url = server["url"] + "/v1/completions"
    headers = {"content-type": "application/json"}
    r = httpx.post(url, content=b'{"prompt": "RO\xff\xfeMEO:"}', headers=headers)
    assert r.status_code == 400
    assert r.json()["error"]["message"].startswith("the request body is not valid JSON: not UTF-8")
    for body, says in (  # both under 64 KiB; FastAPI said "There was an error parsing the body"
        (b'{"prompt": "A", "seed": ' + b"9" * 5000 + b"}", "a number of more than 4300 digits"),
        (b'{"prompt": ' + b"[" * 30_000 + b"]" * 30_000 + b"}", "nests too deeply"),
    ):
        r = httpx.post(url, content=body, headers=headers)
        assert r.status_code == 400 and says in r.json()["error"]["message"], r.text
    for field in ("temperature", "top_p", "presence_penalty"):  # JSON has no NaN: Python's does
        for value in ("NaN", "Infinity"):
            body = f'{{"prompt": "A", "{field}": {value}}}'.encode()
            r = httpx.post(url, content=body, headers=headers)
            assert r.status_code == 400 and r.json()["error"]["param"] == field, r.text
            assert "finite" in r.json()["error"]["message"], r.text


def test_slow_body_is_cut_off(server):
    host, port = server["url"].removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=30) as s:
        s.sendall(
            b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            b'Content-Length: 100\r\n\r\n{"prompt":'
        )
        started = time.time()
        reply = s.recv(4096).decode()
    assert reply.startswith("HTTP/1.1 408"), reply
    assert time.time() - started < 10  # cut off at --body-timeout (2 s), not left hanging


def test_burst_of_200_concurrent_requests_all_answered_or_refused(server):
    async def burst():
        limits = httpx.Limits(max_connections=250)
        async with httpx.AsyncClient(timeout=120, limits=limits) as client:

            async def one(i):
                r = await client.post(
                    server["url"] + "/v1/completions",
                    json={"prompt": "A", "max_tokens": 8, "seed": i},
                )
                return r.status_code

            return await asyncio.gather(*(one(i) for i in range(200)))

    codes = asyncio.run(burst())
    assert len(codes) == 200
    assert set(codes) <= {200, 429, 503}, sorted(set(codes))  # answered, or refused outright
    assert codes.count(200) >= 12  # 4 running + 8 queued are always admitted
    # 200 at once against 4 + 8 places: a server without admission limits would answer all.
    assert codes.count(429) + codes.count(503) > 0, sorted(set(codes))
    assert httpx.get(server["url"] + "/health").json()["active"] == 0


def test_openapi_schema_fuzzed_without_server_errors(server):
    st = Path(sys.executable).parent / "st"
    result = subprocess.run(
        [
            str(st),
            "run",
            server["url"] + "/openapi.json",
            "--checks",
            "not_a_server_error",
            "--max-examples",
            "40",
            "--seed",
            "1",
            "--request-timeout",
            "60",
        ],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-2000:]
    assert httpx.get(server["url"] + "/health").status_code == 200


# ----------------------------------------------------------------------- continuous batching


def _stream_text(url, body):
    pieces = []
    with httpx.stream(
        "POST", url + "/v1/completions", json={**body, "stream": True}, timeout=120
    ) as r:
        assert r.status_code == 200, r.read()
        for line in r.iter_lines():
            if line == "data: [DONE]":
                return "".join(pieces)
            if line.startswith("data: "):
                pieces.append(json.loads(line[6:])["choices"][0]["text"])
    raise AssertionError("stream ended without [DONE]")


def test_a_client_leaving_mid_stream_leaves_the_batch_and_others_finish(server):
    url = server["url"]
    body = {"prompt": "KING", "max_tokens": 60, "seed": 2, "temperature": 0.8}
    alone = _stream_text(url, body)
    with ThreadPoolExecutor(1) as pool:
        other = pool.submit(_stream_text, url, body)
        with httpx.stream(
            "POST", url + "/v1/completions", json={**body, "stream": True}, timeout=60
        ) as r:
            for line in r.iter_lines():
                if line.startswith("data: "):
                    break  # the first piece, then hang up
        assert other.result(timeout=120) == alone
    for _ in range(100):  # the dropped row leaves: nothing is left active
        if httpx.get(url + "/health").json()["active"] == 0:
            break
        time.sleep(0.1)
    assert httpx.get(url + "/health").json()["active"] == 0


def test_streaming_clients_that_hang_up_at_once_release_their_admission(server):
    """A client that closes its socket right after sending a streaming request (before the body
    starts) must not keep its admission slot: more of them than max_concurrent + max_queued
    (4 + 8), then nothing is active and a normal request is answered (not 429)."""
    url = server["url"]
    host, port = url.removeprefix("http://").split(":")
    body = json.dumps({"prompt": "KING", "max_tokens": 64, "stream": True}).encode()
    request = (
        b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
        + f"Content-Length: {len(body)}\r\n\r\n".encode()
        + body
    )
    for _ in range(30):
        with socket.create_connection((host, int(port)), timeout=5) as sock:
            sock.sendall(request)
    for _ in range(100):
        if httpx.get(url + "/health").json()["active"] == 0:
            break
        time.sleep(0.1)
    assert httpx.get(url + "/health").json()["active"] == 0
    r = httpx.post(url + "/v1/completions", json={"prompt": "A", "max_tokens": 2})
    assert r.status_code == 200, r.text


def test_a_stream_whose_first_send_fails_releases_its_admission_and_cancels(bundle):
    """Under an ASGI 2.4 server a send to a closed socket raises OSError: the response ends
    before the event generator ever starts (so its own ``finally`` never runs). The streamed
    answer still releases its admission slot and cancels its rows, once."""
    from starlette.requests import ClientDisconnect

    import gptkit
    from gptkit.serve.schemas import CompletionRequest
    from gptkit.serve.service import CompletionService

    service = CompletionService(gptkit.load(bundle), Limits(max_concurrent=1, max_queued=0))

    async def hang_up(message):
        raise OSError("the client closed the connection")

    async def receive():
        return {"type": "http.disconnect"}

    async def one_stream():
        req = CompletionRequest(prompt="KING", max_tokens=30, stream=True)
        response = await service.completions(req)
        assert service.active == 1
        scope = {"type": "http", "asgi": {"spec_version": "2.4"}}
        with pytest.raises(ClientDisconnect):
            await response(scope, receive, hang_up)
        return response

    for _ in range(3):  # more than max_concurrent + max_queued: each slot came back
        response = asyncio.run(one_stream())
        assert service.active == 0 and response.done.ran
    assert service.scheduler.thread.is_alive()


def test_a_stream_sends_its_headers_with_the_first_events_and_ends_with_the_last(bundle):
    """The response start goes out only with the first events (not before the prefill: one
    write and one client wake-up fewer), and the last events carry the end of the body (no
    separate empty one); a client that leaves mid-stream (ASGI 2.3: told by ``receive``) ends
    the response without an error, its rows cancelled and its admission released."""
    import gptkit
    from gptkit.serve.schemas import CLIENT_LEFT, CompletionRequest
    from gptkit.serve.service import CompletionService

    service = CompletionService(gptkit.load(bundle), Limits(max_concurrent=1, max_queued=0))
    scope = {"type": "http", "asgi": {"spec_version": "2.3"}}

    async def whole_stream():
        sent = []
        left = asyncio.Event()

        async def send(message):
            sent.append(message)

        async def receive():
            await left.wait()
            return {"type": "http.disconnect"}

        req = CompletionRequest(prompt="KING", max_tokens=20, stream=True, seed=1)
        await (await service.completions(req))(scope, receive, send)
        return sent

    sent = asyncio.run(whole_stream())
    assert CLIENT_LEFT not in scope  # answered to the end
    assert sent[0]["type"] == "http.response.start" and sent[0]["status"] == 200
    bodies = sent[1:]
    assert bodies and all(m["type"] == "http.response.body" for m in bodies)
    assert all(m["body"] for m in bodies)  # no empty write
    assert [m["more_body"] for m in bodies] == [True] * (len(bodies) - 1) + [False]
    assert bodies[0]["body"].startswith(b"data: {")  # events, not just the headers
    assert bodies[-1]["body"].endswith(b"data: [DONE]\n\n")
    assert service.active == 0

    async def leaving():
        sent = []
        left = asyncio.Event()

        async def send(message):
            sent.append(message)
            if message["type"] == "http.response.body":
                left.set()  # the client reads the first events, then goes away

        async def receive():
            await left.wait()
            return {"type": "http.disconnect"}

        req = CompletionRequest(prompt="KING", max_tokens=1000, stream=True)
        response = await service.completions(req)
        await asyncio.wait_for(response(scope, receive, send), 30)  # returns, no error
        return sent, response

    for _ in range(3):  # more than max_concurrent + max_queued: each slot came back
        scope.pop(CLIENT_LEFT, None)
        sent, response = asyncio.run(leaving())
        assert response.done.ran and service.active == 0
        assert not any(m.get("more_body") is False for m in sent)  # it never finished
        # The status line said 200; the access log is told the client left (499).
        assert sent[0]["status"] == 200 and scope[CLIENT_LEFT] is True

    async def gone_at_once():  # before the first event: the access log is told 499
        sent = []

        async def send(message):
            sent.append(message)

        async def receive():
            return {"type": "http.disconnect"}

        req = CompletionRequest(prompt="KING", max_tokens=1000, stream=True)
        response = await service.completions(req)
        await asyncio.wait_for(response(scope, receive, send), 30)
        return sent, response

    sent, response = asyncio.run(gone_at_once())
    assert [m.get("status") for m in sent] == [499] and response.done.ran
    assert service.active == 0 and service.scheduler.thread.is_alive()


def test_an_http_1_0_client_gets_a_stream_whole_with_its_length(server):
    """HTTP/1.0 has no chunked encoding: the events come in one body with Content-Length
    (uvicorn's httptools protocol would chunk them whatever the request's version)."""
    port = int(server["url"].rsplit(":", 1)[1])
    body = {"prompt": "ROMEO:", "max_tokens": 8, "seed": 2, "stream": True}
    with socket.create_connection(("127.0.0.1", port)) as s:
        s.sendall(_raw_post(body, b"1.0"))
        raw = b""
        while chunk := s.recv(65536):  # HTTP/1.0: the server closes after the answer
            raw += chunk
    head, _, events = raw.partition(b"\r\n\r\n")
    headers = dict(
        line.split(b": ", 1) for line in head.lower().split(b"\r\n")[1:] if b": " in line
    )
    assert head.startswith(b"HTTP/1.1 200") and b"transfer-encoding" not in headers
    assert int(headers[b"content-length"]) == len(events)
    assert events.startswith(b"data: {") and events.endswith(b"data: [DONE]\n\n")
    texts = [
        json.loads(e[6:])["choices"][0]["text"]
        for e in events.split(b"\n\n")
        if e.startswith(b"data: {")
    ]
    whole = httpx.post(server["url"] + "/v1/completions", json={**body, "stream": False})
    assert "".join(texts) == whole.json()["choices"][0]["text"]


@contextmanager
def _served_with_a_log(bundle: Path, log: Path, *options: str, proc_out: list | None = None):
    """A ``gptkit serve`` subprocess of its own, its access log in ``log``; yields (url, port)
    (``proc_out`` gets the process)."""
    port = free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "gptkit", "serve", str(bundle), "--port", str(port), *options],
        stdout=subprocess.DEVNULL,
        stderr=open(log, "w"),
    )
    if proc_out is not None:
        proc_out.append(proc)
    try:
        yield _wait_for(proc, port, log), port
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def _raw_post(body: dict[str, Any], version: bytes = b"1.1") -> bytes:
    """A POST /v1/completions request as bytes, for a raw socket."""
    data = json.dumps(body).encode()
    return (
        b"POST /v1/completions HTTP/%s\r\nHost: x\r\nContent-Type: application/json\r\n"
        b"Content-Length: %d\r\n\r\n%s" % (version, len(data), data)
    )


def _until_idle(url: str) -> None:
    """Wait (30 s at most) until the server decodes nothing and nothing waits."""
    deadline = time.monotonic() + 30
    while httpx.get(url + "/health").json()["active"] and time.monotonic() < deadline:
        time.sleep(0.05)
    assert httpx.get(url + "/health").json()["active"] == 0


def test_a_streamed_client_that_leaves_mid_stream_is_logged_499(bundle, tmp_path):
    """Its headers (200) and first events went out; the access log still says it left."""
    log = tmp_path / "stderr.txt"
    with _served_with_a_log(bundle, log) as (url, port):
        body = {"prompt": "a", "max_tokens": 1024, "n": 16, "stream": True}
        with socket.create_connection(("127.0.0.1", port)) as s:
            s.sendall(_raw_post(body))
            got = b""
            while b"data: {" not in got:  # the status line, headers and first events
                got += s.recv(4096)
        assert got.startswith(b"HTTP/1.1 200")
        _until_idle(url)  # its rows left
        for _ in range(100):  # the line is written as the request's handling ends
            lines = [x for x in log.read_text().splitlines() if '"POST /v1/completions"' in x]
            if lines:
                break
            time.sleep(0.05)
        assert len(lines) == 1 and '" 499 ' in lines[0], lines


def test_a_client_that_leaves_before_its_body_is_sent_is_logged_499(bundle, tmp_path):
    """Gone half-way through its body: the access log said status 0."""
    log = tmp_path / "stderr.txt"
    with _served_with_a_log(bundle, log) as (url, port):
        with socket.create_connection(("127.0.0.1", port)) as s:
            s.sendall(
                b"POST /v1/completions HTTP/1.1\r\nHost: x\r\n"
                b"Content-Type: application/json\r\nContent-Length: 500\r\n\r\n{"
            )
            time.sleep(0.3)
        for _ in range(100):
            lines = [x for x in log.read_text().splitlines() if '"POST /v1/completions"' in x]
            if lines:
                break
            time.sleep(0.05)
        assert len(lines) == 1 and '" 499 ' in lines[0], lines


def test_a_whole_answers_client_that_leaves_has_its_rows_cancelled(bundle, tmp_path):
    """Not streamed: a client that closes its connection while its request waits or decodes
    has its rows cancelled (logged 499), not decoded to the end for nobody."""
    log = tmp_path / "stderr.txt"
    with _served_with_a_log(bundle, log) as (url, port):
        request = _raw_post({"prompt": "ROMEO:", "max_tokens": 1024, "n": 16})
        socks = [socket.create_connection(("127.0.0.1", port)) for _ in range(4)]
        for s in socks:  # 4 x 16 rows x 1024 tokens, 16 rows at a time: seconds of work
            s.sendall(request)
        time.sleep(0.3)
        for s in socks:
            s.close()
        _until_idle(url)
        again = httpx.post(url + "/v1/completions", json={"prompt": "A", "max_tokens": 3})
        assert again.status_code == 200
        lines = [x for x in log.read_text().splitlines() if '"POST /v1/completions"' in x]
        # The first may finish on a fast machine; the others were waiting or decoding.
        assert sum('" 499 ' in x for x in lines) >= 3, lines


def _not_reading(port: int, body: dict[str, Any]) -> socket.socket:
    """A client that sends its request and then reads nothing (a tiny receive buffer, so the
    server's buffers fill soon)."""
    s = socket.socket()
    s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 2048)
    s.connect(("127.0.0.1", port))
    s.sendall(_raw_post(body))
    return s


@pytest.mark.slow  # a server of its own; a few seconds of answers nobody reads
def test_a_client_that_stops_reading_is_dropped_and_does_not_hold_a_shutdown(bundle, tmp_path):
    """An answer that waits --send-timeout for a client reading nothing drops that client
    (streamed, 499: its slot is free; it held it, and so 429 for everyone, for ever), and
    SIGTERM ends the server within that bound (it waited for such a client as long as it
    stayed)."""
    log, procs = tmp_path / "stderr.txt", []
    options = ("--send-timeout", "1", "--max-concurrent", "2", "--max-queued", "0")
    big = {"prompt": "a", "max_tokens": 1024, "n": 16, "logprobs": 5}  # megabytes of answer
    with _served_with_a_log(bundle, log, *options, proc_out=procs) as (url, port):
        stalled = [_not_reading(port, {**big, "stream": True}), _not_reading(port, big)]
        time.sleep(0.5)
        assert httpx.post(url + "/v1/completions", json={"prompt": "A"}).status_code == 429
        _until_idle(url)  # dropped: their slots are free
        again = httpx.post(url + "/v1/completions", json={"prompt": "A", "max_tokens": 3})
        assert again.status_code == 200
        lines = [x for x in log.read_text().splitlines() if '"POST /v1/completions"' in x]
        # The whole answer was written (200); its unread bytes are dropped with the client.
        assert sum('" 499 ' in x for x in lines) == 1, lines
        stalled += [_not_reading(port, {**big, "stream": True}) for _ in range(2)]
        time.sleep(0.5)
        started = time.monotonic()
        procs[0].send_signal(signal.SIGTERM)
        procs[0].wait(timeout=20)
        assert time.monotonic() - started < 10
        said = log.read_text()  # it ended with nothing said
        assert "gptkit: stopping: no new requests" in said and "gptkit: server stopped" in said
        for s in stalled:
            s.close()


def test_ctrl_c_stops_the_server_saying_so_once(bundle, tmp_path):
    """Ctrl-C ended the server with nothing said (then, with 'interrupted' after 'server
    stopped')."""
    log, procs = tmp_path / "stderr.txt", []
    with _served_with_a_log(bundle, log, proc_out=procs) as (url, _):
        assert httpx.get(url + "/health").status_code == 200
        procs[0].send_signal(signal.SIGINT)
        assert procs[0].wait(timeout=30) == 130
    said = log.read_text()
    assert "gptkit: server stopped" in said and "interrupted" not in said, said
    assert "Traceback" not in said


def test_a_json_body_sent_as_a_form_is_told_its_content_type(server):
    """``curl -d '{...}'`` says form-urlencoded: the 400 says what to send, not that the body is
    not an object."""
    r = httpx.post(
        server["url"] + "/v1/completions",
        content=json.dumps({"prompt": "A", "max_tokens": 2}),
        headers={"content-type": "application/x-www-form-urlencoded"},
    )
    assert r.status_code == 400
    assert "Content-Type: application/json" in r.json()["error"]["message"]
    empty = httpx.post(server["url"] + "/v1/completions")  # curl -X POST: no body at all
    assert empty.status_code == 400 and "no body" in empty.json()["error"]["message"]
    ok = httpx.post(
        server["url"] + "/v1/completions",
        content=json.dumps({"prompt": "A", "max_tokens": 2}),
        headers={"content-type": "application/json; charset=utf-8"},
    )
    assert ok.status_code == 200


def _without_streamed_routes(app):
    """The same app with every request going through FastAPI's own routes."""
    from gptkit.serve.middleware import StreamedRoutes

    kept = [m for m in app.user_middleware if m.cls is not StreamedRoutes]
    assert len(kept) == len(app.user_middleware) - 1  # create_app installs it
    app.user_middleware, app.middleware_stack = kept, None
    return app


def _same_answer(text: str) -> Any:
    """An answer without what may differ between two identical requests: ids, times, and how
    a stream's text is cut into events (that follows the decoding thread's timing); a stream
    is its events' fields joined per choice, in order."""
    text = re.sub(r'"id": ?"(cmpl|chatcmpl)-[^"]*"', '"id": "-"', text)
    text = re.sub(r'"created": ?\d+', '"created": 0', text)
    if not text.startswith("data: "):
        return text
    events = [e.removeprefix("data: ") for e in text.split("\n\n") if e]
    joined: dict[Any, Any] = {"end": events[-1]}
    for event in map(json.loads, events[:-1]):
        joined["usage"] = event.pop("usage", None) or joined.get("usage")
        for choice in event.pop("choices"):
            row = joined.setdefault(choice.pop("index"), {})
            for key, value in choice.items():
                if isinstance(value, dict):  # delta / logprobs: their lists and strings join
                    for k, v in value.items():
                        if v is not None:
                            row[f"{key}.{k}"] = row.get(f"{key}.{k}", type(v)()) + v
                elif value is not None:
                    row[key] = row.get(key, type(value)()) + value
        joined["rest"] = event  # the same in every event
    return joined


def test_streamed_requests_skip_fastapis_routing_and_answer_exactly_as_it_does(bundle):
    """``StreamedRoutes`` answers a valid ``stream: true`` body itself; the answers (events,
    errors, statuses) are the ones FastAPI's own routes give, for valid and invalid bodies."""
    from starlette.testclient import TestClient

    import gptkit
    from gptkit.serve.app import create_app

    model = gptkit.load(bundle)
    json_type = {"content-type": "application/json"}
    cases = [
        ("/v1/completions", {"prompt": "ROMEO:", "max_tokens": 12, "seed": 3, "stream": True}),
        (
            "/v1/completions",
            {
                "prompt": [[1, 2, 3], [20, 21]],
                "max_tokens": 6,
                "seed": 4,
                "n": 2,
                "logprobs": 2,
                "stop": ["\n"],
                "stream": True,
                "stream_options": {"include_usage": True},
            },
        ),
        ("/v1/completions", {"prompt": "A", "max_tokens": 5, "seed": 1}),  # not streamed
        ("/v1/completions", {"prompt": "A", "stream": True, "frequency": 1}),  # unknown field
        ("/v1/completions", {"prompt": "A", "stream": "yes"}),
        ("/v1/completions", {"prompt": "A", "stream": True, "top_k": 5, "top_p": 0.5}),
        ("/v1/completions", {"prompt": [99999], "stream": True}),
        ("/v1/completions", {"prompt": "A", "stream": True, "max_tokens": 10**6}),
        ("/v1/completions", '{"prompt": "A", "stream": true'),  # not JSON
        ("/v1/completions", "[1, 2]"),
        ("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}], "stream": True}),
        ("/v1/chat/completions", {"messages": [], "stream": True}),
    ]
    answers = []
    for app in (create_app(model), _without_streamed_routes(create_app(model))):
        with TestClient(app) as client:
            got = []
            for path, body in cases:
                content = body if isinstance(body, str) else json.dumps(body)
                r = client.post(path, content=content, headers=json_type)
                got.append((r.status_code, r.headers["content-type"], _same_answer(r.text)))
            form = client.post("/v1/completions", data={"prompt": "A", "stream": "true"})
            got.append((form.status_code, _same_answer(form.text)))
        answers.append(got)
    direct, routed = answers
    assert direct == routed
    assert direct[0][0] == 200 and direct[0][1].startswith("text/event-stream")
    assert direct[0][2]["end"] == "[DONE]" and len(direct[0][2][0]["text"]) > 2
    assert set(direct[1][2]) >= {0, 1, 2, 3, "usage"}  # 2 prompts x n=2, usage at the end
    assert [a[0] for a in direct[3:10]] == [400] * 7


def test_streamed_routes_replay_what_they_do_not_answer(bundle):
    """What ``StreamedRoutes`` hands on reaches the app with its body whole; a valid streamed
    completion never does."""
    import asyncio

    import gptkit
    from gptkit.serve.middleware import StreamedRoutes
    from gptkit.serve.schemas import Limits
    from gptkit.serve.service import CompletionService

    seen = []

    async def app(scope, receive, send):
        seen.append((scope["path"], (await receive())["body"]))
        await send({"type": "http.response.start", "status": 204, "headers": []})
        await send({"type": "http.response.body", "body": b""})

    routes = StreamedRoutes(app, CompletionService(gptkit.load(bundle), Limits()))

    async def post(path, body, content_type=b"application/json"):
        sent, incoming = [], [{"type": "http.request", "body": body, "more_body": False}]

        async def receive():
            if incoming:
                return incoming.pop()
            await asyncio.sleep(3600)  # the client stays

        async def send(message):
            sent.append(message)

        scope = {
            "type": "http",
            "method": "POST",
            "path": path,
            "headers": [(b"content-type", content_type)],
        }
        await routes(scope, receive, send)
        return sent[0]["status"], b"".join(m.get("body", b"") for m in sent[1:])

    async def main():
        streamed = json.dumps({"prompt": "A", "max_tokens": 3, "stream": True}).encode()
        status, body = await post("/v1/completions", streamed)
        assert status == 200 and body.endswith(b"data: [DONE]\n\n") and not seen
        for path, body, kind in [
            ("/v1/completions", b'{"prompt": "A"}', b"application/json"),
            ("/v1/completions", b'{"prompt": "A", "stream": 1}', b"application/json"),
            ("/v1/completions", b"{oops", b"application/json"),
            ("/v1/completions", streamed, b"text/plain"),
            ("/v1/models", streamed, b"application/json"),
        ]:
            assert await post(path, body, kind) == (204, b"")
            assert seen.pop() == (path, body)

    asyncio.run(main())


def test_a_bug_is_a_500_in_openais_shape_and_logged_as_one(bundle, monkeypatch, caplog):
    """An exception no handler expected: OpenAI's error body (not Starlette's plain text), and
    the access log says 500 (it said 0)."""
    from starlette.testclient import TestClient

    import gptkit
    from gptkit.serve.app import create_app
    from gptkit.serve.service import CompletionService

    async def broken(self, req, receive=None):
        raise RuntimeError("a bug")

    monkeypatch.setattr(CompletionService, "completions", broken)
    app = create_app(gptkit.load(bundle))
    with caplog.at_level(logging.INFO, logger="gptkit.access"):
        with TestClient(app, raise_server_exceptions=False) as client:
            for streamed in (False, True):  # FastAPI's route, and StreamedRoutes
                caplog.clear()
                r = client.post("/v1/completions", json={"prompt": "A", "stream": streamed})
                assert r.status_code == 500
                assert r.json()["error"]["type"] == "server_error"
                assert "RuntimeError" in r.json()["error"]["message"]
                assert any('"POST /v1/completions" 500' in m for m in caplog.messages)


def test_concurrent_clients_share_decode_steps_and_get_the_tokens_they_get_alone(server):
    from concurrent.futures import ThreadPoolExecutor

    import gptkit
    from gptkit.inference.decoding import GenerationOptions

    bodies = [
        {"prompt": "ROMEO:", "max_tokens": 40, "temperature": 0},
        {"prompt": "To be", "max_tokens": 30, "seed": 3, "temperature": 0.9, "top_k": 8},
        {"prompt": "KING", "max_tokens": 50, "seed": 4, "top_p": 0.8, "stop": ["\n\n"]},
        {"prompt": "A", "max_tokens": 25, "seed": 5, "n": 2, "temperature": 1.2},
        {"prompt": "First Citizen:", "max_tokens": 35, "seed": 6, "stream": True},
        {
            "prompt": "O",
            "max_tokens": 45,
            "seed": 7,
            "stream": True,
            "temperature": 0.7,
            "stop": ["e"],
        },
    ]

    def ask(body):
        if body.get("stream"):
            return [_stream_text(server["url"], body)]
        r = httpx.post(server["url"] + "/v1/completions", json=body, timeout=120)
        assert r.status_code == 200, r.text
        return [c["text"] for c in r.json()["choices"]]

    with ThreadPoolExecutor(len(bodies)) as pool:
        got = list(pool.map(ask, bodies * 2))  # each twice, at once
    alone = gptkit.load(server["bundle"])
    for body, texts in zip(bodies * 2, got):
        stops = body.get("stop", [])
        options = GenerationOptions(
            max_new_tokens=body["max_tokens"],
            seed=body.get("seed"),
            temperature=body.get("temperature"),
            top_k=body.get("top_k"),
            top_p=body.get("top_p"),
            stop=stops,
        )
        want = alone.complete([body["prompt"]] * body.get("n", 1), options)
        assert texts == [c.text for c in want], body
    assert httpx.get(server["url"] + "/health").json()["peak_batch_rows"] > 1  # batched


# ----------------------------------------------------------------------- OpenAI compatibility


def test_unknown_model_logprobs_and_method_errors_are_openai_shaped(server):
    r = httpx.post(server["url"] + "/v1/completions", json={"prompt": "A", "model": "gpt-4"})
    assert r.status_code == 404 and r.json()["error"]["code"] == "model_not_found"
    ok = httpx.post(
        server["url"] + "/v1/completions",
        json={"prompt": "A", "model": "shakespeare", "max_tokens": 2},
    )
    assert ok.status_code == 200
    r = httpx.post(server["url"] + "/v1/completions", json={"prompt": "A", "logprobs": 9})
    assert r.status_code == 400 and r.json()["error"]["param"] == "logprobs"
    for method, path, status in (("GET", "/v1/completions", 405), ("GET", "/nope", 404)):
        r = httpx.request(method, server["url"] + path)
        assert r.status_code == status
        assert set(r.json()["error"]) == {"message", "type", "param", "code"}
        assert r.json()["error"]["type"] == "invalid_request_error"  # as OpenAI's "Invalid URL"
        assert r.json()["error"]["code"] == {404: "not_found", 405: "method_not_allowed"}[status]
    r = httpx.post(server["url"] + "/v1/completions", json={"prompt": 3})
    assert r.json()["error"]["param"] == "prompt"
    assert r.status_code == 400 and set(r.json()["error"]) == {"message", "type", "param", "code"}


def test_echo_and_include_usage(server):
    r = httpx.post(
        server["url"] + "/v1/completions",
        json={"prompt": "ROMEO:", "max_tokens": 5, "echo": True, "temperature": 0},
    ).json()
    plain = httpx.post(
        server["url"] + "/v1/completions",
        json={"prompt": "ROMEO:", "max_tokens": 5, "temperature": 0},
    ).json()
    assert r["choices"][0]["text"] == "ROMEO:" + plain["choices"][0]["text"]
    body = {
        "prompt": "A",
        "max_tokens": 6,
        "temperature": 0,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    chunks = []
    with httpx.stream("POST", server["url"] + "/v1/completions", json=body) as s:
        for line in s.iter_lines():
            if line.startswith("data: {"):
                chunks.append(json.loads(line[6:]))
    assert chunks[-1]["choices"] == [] and chunks[-1]["usage"]["completion_tokens"] >= 1
    assert chunks[-1]["usage"]["prompt_tokens"] == 1


def test_chat_on_a_base_model_says_so_and_docs_work_offline(server):
    r = httpx.post(
        server["url"] + "/v1/chat/completions",
        json={"messages": [{"role": "user", "content": "hi"}]},
    )
    assert r.status_code == 400 and "base model" in r.json()["error"]["message"]
    docs = httpx.get(server["url"] + "/docs")
    assert docs.status_code == 200 and "/v1/completions" in docs.text
    assert "<script src=" not in docs.text and "cdn" not in docs.text.lower()


def test_openapi_schema_describes_what_is_returned(server):
    schema = httpx.get(server["url"] + "/openapi.json").json()
    op = schema["paths"]["/v1/completions"]["post"]
    ok = op["responses"]["200"]["content"]["application/json"]["schema"]["$ref"]
    assert ok.endswith("/CompletionResponse")
    assert op["responses"]["404"]["content"]["application/json"]["schema"]["$ref"].endswith(
        "/ErrorResponse"
    )
    # Every invalid body is a 400 (never FastAPI's 422); streams are server-sent events.
    assert "422" not in op["responses"] and {"400", "408", "413", "429"} <= set(op["responses"])
    assert "HTTPValidationError" not in schema["components"]["schemas"]
    assert "text/event-stream" in op["responses"]["200"]["content"]
    fields = schema["components"]["schemas"]["CompletionResponse"]["properties"]
    body = httpx.post(
        server["url"] + "/v1/completions", json={"prompt": "A", "max_tokens": 2}
    ).json()
    assert set(body) == set(fields)


def test_access_log_lines(server):
    httpx.get(server["url"] + "/v1/models")
    time.sleep(0.2)
    assert '"GET /v1/models" 200' in server["log"].read_text()


# ----------------------------------------------------------------------- issue 18: the socket


def test_client_that_never_finishes_its_headers_is_dropped(server):
    host, port = server["url"].removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=30) as s:
        s.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\n")
        started = time.time()
        while True:  # trickle a header byte now and then: still cut off at --header-timeout
            try:
                s.sendall(b"X")
            except OSError:
                break
            s.settimeout(0.5)
            try:
                if s.recv(4096) == b"":
                    break
            except TimeoutError:
                pass
            assert time.time() - started < 15, "the connection was never dropped"
    assert time.time() - started < 10
    assert httpx.get(server["url"] + "/health").status_code == 200


def test_busy_port_and_bad_host_exit_2_before_serving(server, bundle):
    port = server["url"].rsplit(":", 1)[1]
    busy = run_cli("serve", bundle, "--port", port, timeout=60)
    assert_user_error(busy, f"port {port} on 127.0.0.1 is in use", "--port")
    assert "serving on" not in busy.stdout
    bad = run_cli("serve", bundle, "--host", "no-such-host.invalid", timeout=60)
    assert_user_error(bad, "--host 'no-such-host.invalid'")
    assert "serving on" not in bad.stdout


def test_the_printed_url_works_on_ipv6_and_a_file_is_not_called_a_non_run(bundle, tmp_path):
    """``--host ::1`` prints ``http://[::1]:PORT`` (RFC 3986; ``http://::1:PORT`` is no URL);
    a bundle's manifest file given for its folder is told a bundle folder is taken too."""
    try:
        socket.socket(socket.AF_INET6).bind(("::1", 0))
    except OSError:
        pytest.skip("no IPv6 loopback here")
    port = free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "gptkit", "serve", str(bundle), "--host", "::1",
         "--port", str(port)],
        stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
    )  # fmt: skip
    try:
        line = proc.stdout.readline()
        url = line.split(" on ")[1].split()[0]
        assert url == f"http://[::1]:{port}", line
        assert httpx.get(url + "/health", timeout=30).status_code == 200
    finally:
        proc.terminate()
        proc.wait(timeout=30)
    a_file = run_cli("serve", bundle / "gptkit.json", "--port", "0", timeout=60)
    assert_user_error(
        a_file, "is a file; expected an export bundle's folder", "the bundle's folder"
    )
    # the path's mistake is said before a busy port's (it said "port N is in use")
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen(1)
        taken = str(busy.getsockname()[1])
        assert_user_error(run_cli("serve", bundle / "nope", "--port", taken), "not found")
        assert_user_error(run_cli("serve", bundle / "gptkit.json", "--port", taken), "is a file")


def _drive(scheduler, jobs, loop):
    """Submit the jobs and collect each one's events up to its first that is not "text"."""

    async def collect(job):
        events = []
        while not events or events[-1][0] == "text":
            events.append(await job.events.get())
        return events

    async def main():
        for job in jobs:
            scheduler.submit(job)
        return await asyncio.gather(*(collect(j) for j in jobs))

    return loop.run_until_complete(asyncio.wait_for(main(), 120))


def test_a_failing_step_is_reported_to_every_request_and_the_scheduler_goes_on(bundle):
    import gptkit
    from gptkit.serve.scheduler import Job, Scheduler

    loaded = gptkit.load(bundle)
    real, calls = loaded.backend, []

    class Failing:  # the real backend, except that its third call raises
        def __getattr__(self, name):
            return getattr(real, name)

        def __call__(self, *args):
            calls.append(1)
            if len(calls) == 3:
                raise RuntimeError("the accelerator fell over")
            return real(*args)

    loaded.backend = Failing()
    loop = asyncio.new_event_loop()
    sampler = loaded.sampler_for(GenerationOptions(temperature=0))
    scheduler = Scheduler(loaded, max_rows=8)

    def job(prompt, stream):
        return Job([loaded.tokenizer.encode(prompt)], sampler, None, 20, stream, loop)

    try:
        failed = _drive(scheduler, [job("ROMEO:", True), job("KING", False)], loop)
        after = _drive(scheduler, [job("To be", True)], loop)
    finally:
        loop.close()
    for events in failed:
        assert events[-1] == ("error", "RuntimeError: the accelerator fell over")
    assert after[0][-1][0] == "done" and len(after[0][-1][1][0].tokens) == 20


def test_requests_with_equal_options_share_one_sampler(bundle):
    """The service builds a sampler once per distinct options (rows with the same sampler
    object are drawn together), and different options get their own."""
    import gptkit
    from gptkit.serve.service import CompletionService

    service = CompletionService(gptkit.load(bundle), Limits())
    first = service.sampler_for(GenerationOptions(temperature=0.7, stop=["\n"]))
    again = service.sampler_for(GenerationOptions(temperature=0.7, stop=["\n"]))
    other = service.sampler_for(GenerationOptions(temperature=0.7, stop=["x"]))
    assert first is again and other is not first
    assert (first.temperature, first.stop, other.stop) == (0.7, ["\n"], ["x"])
    assert service.sampler_for(GenerationOptions(temperature=0)).kind == "greedy"


def test_the_scheduler_decodes_at_most_max_requests_together(bundle):
    """``--max-concurrent`` counts requests, not rows: with one, three requests are decoded
    one after another (each still whole and as it is alone), while one request's n rows
    always go together."""
    import gptkit
    from gptkit.serve.scheduler import Job, Scheduler

    loaded = gptkit.load(bundle)
    loop = asyncio.new_event_loop()
    sampler = loaded.sampler_for(GenerationOptions(temperature=0))
    ids = loaded.tokenizer.encode("ROMEO:")
    jobs = [Job([ids], sampler, None, 12, False, loop) for _ in range(3)]
    jobs.append(Job([ids] * 4, sampler, None, 12, False, loop))  # n=4: one request
    scheduler = Scheduler(loaded, max_rows=16, max_requests=1)
    try:
        results = _drive(scheduler, jobs, loop)
    finally:
        loop.close()
    alone = loaded.complete(["ROMEO:"], max_new_tokens=12, temperature=0)[0].text
    assert [[c.text for c in events[-1][1]] for events in results] == [[alone]] * 3 + [[alone] * 4]
    assert scheduler.peak_rows == 4  # never two requests together; the n=4 one's rows at once


def test_the_scheduler_wakes_the_event_loop_once_per_step_for_every_request(bundle):
    """Events reach the handlers' queues in one hand-over per decode step, whatever the
    number of rows; each request still gets all of its text, in order, then "done"."""
    import gptkit
    from gptkit.serve.scheduler import Job, Scheduler

    loaded = gptkit.load(bundle)
    loop = asyncio.new_event_loop()
    handovers = []
    real = loop.call_soon_threadsafe

    def counting(callback, *args):
        handovers.append(len(args[0]))
        return real(callback, *args)

    loop.call_soon_threadsafe = counting
    sampler = loaded.sampler_for(GenerationOptions(temperature=0))
    jobs = [
        Job([loaded.tokenizer.encode(p)], sampler, None, 20, True, loop)
        for p in ("ROMEO:", "KING", "To be")
    ]
    scheduler = Scheduler(loaded, max_rows=8)
    try:
        results = _drive(scheduler, jobs, loop)
    finally:
        loop.close()
    for events in results:
        kind, completions = events[-1]
        assert kind == "done"
        assert "".join(e[2] for e in events[:-1]) == completions[0].text
    assert scheduler.peak_rows == 3
    # 3 rows decoded together: each hand-over carries every row's event of that step.
    assert max(handovers) >= 3
    assert len(handovers) < sum(len(e) for e in results)


def test_streamed_text_is_handed_over_at_most_every_stream_interval(bundle):
    """Text decoded between two hand-overs goes out together: a request's first text, its
    end and errors at once, the rest at most every ``stream_interval`` seconds; with 0 every
    decode step is handed over. Either way each request gets all of its text, in order."""
    import gptkit
    from gptkit.serve.scheduler import Job, Scheduler

    loaded = gptkit.load(bundle)
    sampler = loaded.sampler_for(GenerationOptions(temperature=0))
    counts = {}
    for interval in (0.0, 0.05):
        loop = asyncio.new_event_loop()
        handovers = []
        real = loop.call_soon_threadsafe

        def counting(callback, *args, real=real, handovers=handovers):
            handovers.append(len(args[0]))
            return real(callback, *args)

        loop.call_soon_threadsafe = counting
        jobs = [
            Job([loaded.tokenizer.encode(p)], sampler, None, 60, True, loop)
            for p in ("ROMEO:", "KING")
        ]
        scheduler = Scheduler(loaded, max_rows=8, stream_interval=interval)
        started = time.perf_counter()
        try:
            results = _drive(scheduler, jobs, loop)
        finally:
            loop.close()
        elapsed = time.perf_counter() - started
        for events in results:
            kind, completions = events[-1]
            assert kind == "done"
            assert "".join(e[2] for e in events[:-1]) == completions[0].text
        steps = max(len(events[-1][1][0].tokens) for events in results)
        counts[interval] = (len(handovers), elapsed)
    every_step, _ = counts[0.0]
    coalesced, elapsed = counts[0.05]
    assert steps >= 20 and every_step >= steps  # one hand-over per decode step
    # 2 first texts + 2 ends at once, the rest at most once per interval.
    assert coalesced <= 4 + elapsed / 0.05 + 1
    assert coalesced < every_step


CHAT_TEMPLATE = (
    "{% for m in messages %}{{ m['role'] }}{% if m.name %} {{ m.name }}{% endif %}: "
    "{{ m['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}assistant:{% endif %}"
)


@pytest.fixture(scope="module")
def chat_server(tmp_path_factory):
    """A bundle whose tokenizer has a chat template (trained a few steps), served; a template
    that does not parse is refused when the spec is read."""
    import yaml

    tmp_path = tmp_path_factory.mktemp("chat")
    root = Path(__file__).resolve().parents[2]
    spec = {
        "extends": str(root / "experiments" / "smoke.yaml"),
        "name": "chat",
        "tokenizer": {"kind": "char", "chat_template": HOSTILE + CHAT_TEMPLATE},
        "train": {"max_steps": 5},
        "tracking": {"enabled": False},
    }
    (tmp_path / "chat.yaml").write_text(yaml.safe_dump(spec))
    bad = {**spec, "tokenizer": {"kind": "char", "chat_template": "{% for m in %}"}}
    (tmp_path / "bad.yaml").write_text(yaml.safe_dump(bad))
    assert_user_error(run_cli("validate", tmp_path / "bad.yaml"), "chat_template")
    trained = run_cli(
        "train", tmp_path / "chat.yaml", "--run-dir", tmp_path / "run", "--no-progress",
        cwd=tmp_path,
    )  # fmt: skip
    assert trained.returncode == 0, trained.stderr
    exported = run_cli("export", tmp_path / "run", "--out", tmp_path / "b", cwd=tmp_path)
    assert exported.returncode == 0, exported.stderr
    port, log = free_port(), tmp_path / "serve.txt"
    # A deadline of 6 s, not the default 2: the template that doubles a string must reach
    # the memory ceiling first even on a slow, loaded machine (under `-n 2` on a slow 2-core
    # machine it took over 2 s and was cut by the deadline instead).
    command = [sys.executable, "-m", "gptkit", "serve", str(tmp_path / "b"), "--port", str(port)]
    proc = subprocess.Popen(
        [*command, "--template-timeout", "6"], stdout=subprocess.DEVNULL, stderr=open(log, "w")
    )
    try:
        yield _wait_for(proc, port, log)
    finally:
        proc.terminate()
        proc.wait(timeout=30)


# Template branches a hostile user could write (picked by the first message's content):
# loop 10^10 times, double a string 40 times, render 50,000 characters.
HOSTILE = (
    "{% if messages[0]['content'] == 'loop' %}{% for i in range(100000) %}"
    "{% for j in range(100000) %}{% endfor %}{% endfor %}"
    "{% elif messages[0]['content'] == 'grow' %}{% set ns = namespace(s='xxxxxxxx') %}"
    "{% for i in range(40) %}{% set ns.s = ns.s ~ ns.s %}{% endfor %}{{ ns.s|length }}"
    "{% elif messages[0]['content'] == 'long' %}{% for i in range(5000) %}0123456789"
    "{% endfor %}{% endif %}"
)


def test_chat_with_a_template_answers_what_the_rendered_prompt_would(chat_server):
    """/v1/chat/completions renders the messages with the tokenizer's chat template and
    answers exactly what /v1/completions answers for the rendered prompt."""
    url = chat_server
    messages = [{"role": "user", "content": "ROMEO"}]
    chat = httpx.post(
        url + "/v1/chat/completions",
        json={"messages": messages, "max_tokens": 8, "temperature": 0},
    ).json()
    prompt = "user: ROMEO\nassistant:"
    plain = httpx.post(
        url + "/v1/completions", json={"prompt": prompt, "max_tokens": 8, "temperature": 0}
    ).json()
    assert chat.get("object") == "chat.completion", chat
    assert chat["id"].startswith("chatcmpl-") and plain["id"].startswith("cmpl-")
    message = chat["choices"][0]["message"]
    assert message["role"] == "assistant"
    assert message["content"] == plain["choices"][0]["text"] and message["content"]
    assert chat["usage"]["prompt_tokens"] == plain["usage"]["prompt_tokens"] == len(prompt)
    pieces = []
    with httpx.stream(
        "POST",
        url + "/v1/chat/completions",
        json={"messages": messages, "max_tokens": 8, "temperature": 0, "stream": True},
    ) as r:
        for line in r.iter_lines():
            if line.startswith("data: {"):
                chunk = json.loads(line[6:])
                assert chunk["object"] == "chat.completion.chunk"
                pieces += [c["delta"] for c in chunk["choices"]]
    assert pieces[0]["role"] == "assistant"  # the first chunk names the role
    assert "".join(p.get("content", "") for p in pieces) == message["content"]
    # A message's name (OpenAI's field) is given to the template, which shows it here.
    named = [{"role": "user", "content": "ROMEO", "name": "ANN"}]
    chat = httpx.post(
        url + "/v1/chat/completions", json={"messages": named, "max_tokens": 8, "temperature": 0}
    ).json()
    prompt = "user ANN: ROMEO\nassistant:"
    plain = httpx.post(
        url + "/v1/completions", json={"prompt": prompt, "max_tokens": 8, "temperature": 0}
    ).json()
    assert chat["usage"]["prompt_tokens"] == len(prompt), chat
    assert chat["choices"][0]["message"]["content"] == plain["choices"][0]["text"]


def test_a_hostile_chat_template_gets_a_400_while_others_are_answered(chat_server):
    """Templates render in a worker process with a deadline (6 s here), a memory ceiling and a
    size bound: a template that loops 10^10 times gets a 400 while /health and other chats
    are answered at once; a 2^43-byte string and a 50,000-character prompt get a 400; the
    server goes on answering."""
    import concurrent.futures

    url = chat_server

    def chat(content: str) -> httpx.Response:
        body = {"messages": [{"role": "user", "content": content}], "max_tokens": 4}
        return httpx.post(url + "/v1/chat/completions", json=body, timeout=60)

    with concurrent.futures.ThreadPoolExecutor(2) as pool:
        started = time.perf_counter()
        looping = pool.submit(chat, "loop")
        time.sleep(0.3)  # the loop is running in the template worker
        health = httpx.get(url + "/health", timeout=60)
        health_s = time.perf_counter() - started
        plain = httpx.post(
            url + "/v1/completions", json={"prompt": "A", "max_tokens": 4}, timeout=60
        )
        assert health.status_code == 200 and plain.status_code == 200
        assert not looping.done() and health_s < 2.0  # answered while the loop ran
        r = looping.result()
    assert r.status_code == 400 and r.json()["error"]["param"] == "messages", r.text
    assert "longer than" in r.json()["error"]["message"]
    assert time.perf_counter() - started < 20
    grow = chat("grow")
    assert grow.status_code == 400 and "memory" in grow.json()["error"]["message"], grow.text
    long = chat("long")
    assert long.status_code == 400 and "characters" in long.json()["error"]["message"]
    assert chat("ROMEO").status_code == 200  # a new worker renders the next request


def test_serve_with_torch_unimportable_answers_like_the_regular_server(server, tmp_path):
    port = free_port()
    log = tmp_path / "stderr.txt"
    code = "import sys; sys.modules['torch'] = None\nfrom gptkit.cli import main; main()"
    proc = subprocess.Popen(
        [sys.executable, "-c", code, "serve", str(server["bundle"]), "--port", str(port)],
        stdout=subprocess.PIPE,
        stderr=open(log, "w"),
        text=True,
    )
    try:
        url = _wait_for(proc, port, log)
        body = {"prompt": "ROMEO:", "max_tokens": 20, "seed": 7, "temperature": 0.8}
        blocked = httpx.post(url + "/v1/completions", json=body, timeout=60).json()
        regular = httpx.post(server["url"] + "/v1/completions", json=body, timeout=60).json()
        assert blocked["choices"][0]["text"] == regular["choices"][0]["text"]
        assert len(blocked["choices"][0]["text"]) > 0
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def test_the_servers_runtime_leaves_the_cpu_to_its_http_side(bundle):
    """``spin=False`` (what ``gptkit serve`` opens bundles with) turns onnxruntime's
    spin-waiting off; the default keeps it (fastest when decoding is all a process does)."""
    import gptkit

    key = "session.intra_op.allow_spinning"
    served = gptkit.load(bundle, threads=1, spin=False).model.session.get_session_options()
    assert served.intra_op_num_threads == 1 and served.get_session_config_entry(key) == "0"
    alone = gptkit.load(bundle).model.session.get_session_options()
    with pytest.raises(RuntimeError):  # not set: onnxruntime's default, spinning
        alone.get_session_config_entry(key)


def test_a_template_worker_start_up_is_not_taken_from_the_render_deadline():
    """The worker (a new Python process) is started before the deadline runs: on a busy
    machine its start-up alone can pass the deadline, and a plain template got a 400 for it
    (the request after a runaway template, whose worker was killed, always starts one)."""
    from gptkit.serve.templates import TemplateRenderer

    renderer = TemplateRenderer(timeout_s=0.05)  # far less than starting Python and Jinja
    messages = [{"role": "user", "content": "hi"}]
    try:
        assert renderer.render("{{ messages[0]['content'] }}!", messages) == "hi!"
        renderer._stop()  # as after a runaway template: the next render starts a new worker
        assert renderer.render("{{ messages[0]['content'] }}?", messages) == "hi?"
    finally:
        renderer._stop()


def test_a_first_text_hand_over_is_marked_sent_after_the_handlers_it_woke_have_run():
    """``_deliver`` sets its ``sent`` event only once the handler waiting on the queue has
    taken its event: the decoding thread waits for that before its next step."""
    import threading

    from gptkit.serve.scheduler import _deliver

    async def main():
        queue, got = asyncio.Queue(), []

        class JobLike:
            events = queue

        async def handler():
            got.append(await queue.get())

        task = asyncio.create_task(handler())
        await asyncio.sleep(0)  # the handler waits on its queue
        sent = threading.Event()
        _deliver([(JobLike, ("text", 0, "a", []))], sent)
        assert not sent.is_set()
        seen_when_set = None
        for _ in range(10):
            await asyncio.sleep(0)
            if sent.is_set():
                seen_when_set = list(got)
                break
        await task
        return seen_when_set

    assert asyncio.run(main()) == [("text", 0, "a", [])]


def test_a_stalled_event_loop_does_not_stall_decoding(bundle):
    """After a hand-over with a first text the decoding thread waits for the event loop, and
    the wait is bounded: with an event loop that runs nothing, the request still finishes
    after one ``first_text_wait`` (its only first text), and its events are all there."""
    import gptkit
    from gptkit.serve.scheduler import Job, Scheduler

    loaded = gptkit.load(bundle)
    loop = asyncio.new_event_loop()  # never running while the request decodes
    sampler = loaded.sampler_for(GenerationOptions(temperature=0))
    scheduler = Scheduler(loaded, max_rows=8)
    scheduler.first_text_wait = 0.5
    job = Job([loaded.tokenizer.encode("ROMEO:")], sampler, None, 30, True, loop)
    started = time.perf_counter()
    try:
        scheduler.submit(job)
        while not (job.rows and all(r.done for r in job.rows)):
            assert time.perf_counter() - started < 60, "decoding stalled"
            time.sleep(0.01)
        decoded_in = time.perf_counter() - started

        async def collect():
            events = [await job.events.get()]
            while events[-1][0] == "text":
                events.append(await job.events.get())
            return events

        events = loop.run_until_complete(asyncio.wait_for(collect(), 30))
    finally:
        loop.close()
    assert events[-1][0] == "done"
    assert "".join(e[2] for e in events[:-1]) == events[-1][1][0].text
    assert 0.5 <= decoded_in < 30  # it waited for the first text's hand-over, once, bounded


def test_a_full_server_answers_429_in_openais_shape(bundle):
    """Beyond ``max_concurrent + max_queued`` a request is refused at once: 429 with
    ``Retry-After``, type ``rate_limit_error`` and code ``rate_limit_exceeded``."""
    import gptkit
    from gptkit.serve.schemas import CompletionRequest
    from gptkit.serve.service import CompletionService

    service = CompletionService(gptkit.load(bundle), Limits(max_concurrent=1, max_queued=0))
    assert service.admit()  # the one slot is taken
    refused = asyncio.run(service.completions(CompletionRequest(prompt="KING", max_tokens=2)))
    assert refused.status_code == 429 and refused.headers["retry-after"] == "1"
    error = json.loads(refused.body)["error"]
    assert (error["type"], error["code"]) == ("rate_limit_error", "rate_limit_exceeded")
    service.release()
    answered = asyncio.run(service.completions(CompletionRequest(prompt="KING", max_tokens=2)))
    assert answered["usage"]["completion_tokens"] == 2


def test_a_full_server_refuses_prompt_scoring_before_doing_it(bundle, monkeypatch):
    """``echo`` with ``logprobs`` scores the prompt (a forward pass): that work is admitted
    like generating, so a full server answers 429 without it, and it holds a slot while it
    runs (a flood of scoring requests is bounded as generation is)."""
    import gptkit
    from gptkit.serve import service as service_module
    from gptkit.serve.schemas import CompletionRequest
    from gptkit.serve.service import CompletionService

    service = CompletionService(gptkit.load(bundle), Limits(max_concurrent=1, max_queued=0))
    scored, active = [], []
    real = service_module.prompt_logprobs

    def spy(*args):
        scored.append(args[1])
        active.append(service.active)
        return real(*args)

    monkeypatch.setattr(service_module, "prompt_logprobs", spy)
    req = CompletionRequest(prompt="KING", max_tokens=0, echo=True, logprobs=1)
    assert service.admit()  # the one slot is taken
    refused = asyncio.run(service.completions(req))
    assert refused.status_code == 429 and scored == []
    service.release()
    answered = asyncio.run(service.completions(req))
    assert len(scored) == 1 and active == [1]  # scored holding the slot
    assert answered["choices"][0]["text"] == "KING" and service.active == 0
