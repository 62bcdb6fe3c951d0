"""The HTTP server, run for real as `gptkit serve` and hit over a socket."""

import asyncio
import json
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from tests.helpers import run_cli
from tests.mlflow_server import free_port


@pytest.fixture(scope="module")
def bundle(smoke_run, tmp_path_factory):
    out = tmp_path_factory.mktemp("serve") / "b"
    result = run_cli("export", smoke_run, "--out", out, cwd=smoke_run.parent)
    assert result.returncode == 0, result.stderr
    return out


@pytest.fixture(scope="module")
def server(bundle):
    port = free_port()
    started = time.perf_counter()
    proc = subprocess.Popen(
        [sys.executable, "-m", "gptkit", "serve", str(bundle), "--port", str(port),
         "--max-concurrent", "2", "--max-queued", "8", "--max-tokens", "64",
         "--body-timeout", "2"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    url = f"http://127.0.0.1:{port}"
    for _ in range(300):
        try:
            if httpx.get(url + "/health", timeout=1).status_code == 200:
                break
        except httpx.HTTPError:
            time.sleep(0.1)
    else:
        proc.kill()
        raise AssertionError(proc.stderr.read())
    yield {"url": url, "proc": proc, "startup_s": time.perf_counter() - started}
    proc.terminate()
    proc.wait(timeout=30)


def test_health_models_and_no_torch_in_the_process(server):
    assert httpx.get(server["url"] + "/health").json()["status"] == "ok"
    models = httpx.get(server["url"] + "/v1/models").json()
    assert models["data"][0]["id"] == "smoke" and models["data"][0]["max_seq_len"] == 32
    maps = open(f"/proc/{server['proc'].pid}/maps").read()
    assert "libtorch" not in maps and "onnxruntime" in maps


def test_completion_seeded_and_repeatable(server):
    body = {"prompt": "ROMEO:", "max_tokens": 20, "seed": 7, "temperature": 0.8, "top_k": 10}
    a = httpx.post(server["url"] + "/v1/completions", json=body).json()
    b = httpx.post(server["url"] + "/v1/completions", json=body).json()
    assert a["choices"][0]["text"] == b["choices"][0]["text"]
    assert a["object"] == "text_completion" and a["usage"]["prompt_tokens"] == 6
    assert a["choices"][0]["finish_reason"] in ("length", "stop")


def test_list_of_prompts_and_n(server):
    r = httpx.post(server["url"] + "/v1/completions",
                   json={"prompt": ["A", "BB"], "n": 2, "max_tokens": 5, "seed": 1}).json()
    assert [c["index"] for c in r["choices"]] == [0, 1, 2, 3]


def test_stop_string(server):
    r = httpx.post(server["url"] + "/v1/completions",
                   json={"prompt": "A", "max_tokens": 60, "temperature": 0, "stop": ["e"]})
    text = r.json()["choices"][0]["text"]
    assert "e" not in text


def test_streaming_server_sent_events(server):
    body = {"prompt": "ROMEO:", "max_tokens": 30, "seed": 3, "stream": True, "temperature": 0}
    pieces, done = [], False
    with httpx.stream("POST", server["url"] + "/v1/completions", json=body) as r:
        assert r.headers["content-type"].startswith("text/event-stream")
        for line in r.iter_lines():
            if not line.startswith("data: "):
                continue
            if line == "data: [DONE]":
                done = True
                break
            pieces.append(json.loads(line[6:])["choices"][0]["text"])
    assert done and len(pieces) > 2
    whole = httpx.post(server["url"] + "/v1/completions", json={**body, "stream": False}).json()
    assert "".join(pieces) == whole["choices"][0]["text"]


@pytest.mark.parametrize(("body", "status", "needle"), [
    ({"prompt": "A", "max_tokens": 1000}, 400, "max_tokens: at most 64"),
    ({"prompt": "A", "top_p": 1.5}, 422, "top_p"),
    ({"prompt": "A", "max_tokens": -1}, 422, "max_tokens"),
    ({"max_tokens": 3}, 422, "prompt"),
    ({"prompt": "x" * 40}, 400, "the context is 32"),
    ({"prompt": "snow ☃"}, 400, "never saw"),
    ({"prompt": [], "max_tokens": 3}, 400, "non-empty list"),
    ({"prompt": "A", "n": 99}, 422, "n"),
    ({"prompt": "A", "stop": ["a", "b", "c", "d", "e"]}, 400, "stop"),
])
def test_bad_requests_get_4xx_and_the_server_keeps_serving(server, body, status, needle):
    r = httpx.post(server["url"] + "/v1/completions", json=body)
    assert r.status_code == status, r.text
    assert needle in r.json()["error"]["message"]
    assert httpx.get(server["url"] + "/health").status_code == 200


def test_malformed_json_and_oversized_body(server):
    r = httpx.post(server["url"] + "/v1/completions", content=b"{not json",
                   headers={"content-type": "application/json"})
    assert r.status_code == 422
    big = httpx.post(server["url"] + "/v1/completions", content=b"x" * 200_000,
                     headers={"content-type": "application/json"})
    assert big.status_code == 413


def test_slow_body_is_cut_off(server):
    host, port = server["url"].removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=30) as s:
        s.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                  b"Content-Length: 100\r\n\r\n{\"prompt\":")
        started = time.time()
        reply = s.recv(4096).decode()
    assert reply.startswith("HTTP/1.1 408"), reply
    assert time.time() - started < 10  # cut off at --body-timeout (2 s), not left hanging


def test_burst_of_200_concurrent_requests_all_answered_or_refused(server):
    async def burst():
        limits = httpx.Limits(max_connections=250)
        async with httpx.AsyncClient(timeout=120, limits=limits) as client:
            async def one(i):
                r = await client.post(server["url"] + "/v1/completions",
                                      json={"prompt": "A", "max_tokens": 8, "seed": i})
                return r.status_code
            return await asyncio.gather(*(one(i) for i in range(200)))

    codes = asyncio.run(burst())
    assert len(codes) == 200
    assert set(codes) <= {200, 429, 503}, sorted(set(codes))  # answered, or refused outright
    assert codes.count(200) >= 10  # 2 running + 8 queued are always admitted
    assert httpx.get(server["url"] + "/health").json()["active"] == 0


def test_openapi_schema_fuzzed_without_server_errors(server):
    st = Path(sys.executable).parent / "st"
    result = subprocess.run(
        [str(st), "run", server["url"] + "/openapi.json", "--checks", "not_a_server_error",
         "--max-examples", "40", "--seed", "1", "--request-timeout", "60"],
        capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-2000:]
    assert httpx.get(server["url"] + "/health").status_code == 200
