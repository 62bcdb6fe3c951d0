"""The serving overhead (``gptkit bench --serve PATH``): what the runtime does on its own, batch 1
and batch N, next to what ``gptkit serve`` delivers to 1 and N concurrent streaming clients, in
one run, so the ratio is the cost of the serving path (HTTP, scheduling, server-sent events).

Each client runs in its own process (client threads of one Python process would share its GIL
and be what is measured); tokens are counted from the server's own usage figures.
"""

from __future__ import annotations

import http.client
import json
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from gptkit.errors import GptkitError


class Client:
    """One client process's HTTP/1.1 connection to the server, kept alive across requests (as
    OpenAI's client keeps one). The standard library's client, not httpx: on a small machine the
    clients share the server's cores, and httpx spends twice the CPU per streamed request
    (2.3 vs 1.0 ms for 128 tokens), which the bench would count as serving overhead."""

    conn: http.client.HTTPConnection | None = None

    @classmethod
    def request(
        cls, url: str, method: str, path: str, body: dict[str, Any] | None = None
    ) -> http.client.HTTPResponse:
        data = None if body is None else json.dumps(body).encode()
        try:
            return cls._send(url, method, path, data)
        except (ConnectionError, http.client.HTTPException):  # a kept-alive one the server closed
            cls.conn = None
            return cls._send(url, method, path, data)

    @classmethod
    def _send(
        cls, url: str, method: str, path: str, data: bytes | None
    ) -> http.client.HTTPResponse:
        parts = urlsplit(url)
        if cls.conn is None or (cls.conn.host, cls.conn.port) != (parts.hostname, parts.port):
            cls.conn = http.client.HTTPConnection(parts.hostname or "", parts.port, timeout=600)
        headers = {"Content-Type": "application/json"} if data is not None else {}
        cls.conn.request(method, path, body=data, headers=headers)
        return cls.conn.getresponse()


def stream_one(url: str, body: dict[str, Any]) -> tuple[float | None, float, int, float]:
    """One streaming completion: (seconds to the first text, seconds to the end, tokens, this
    client's CPU seconds)."""
    t0, cpu = time.perf_counter(), time.process_time()
    first, tokens = None, 0
    body = {**body, "stream": True, "stream_options": {"include_usage": True}}
    r = Client.request(url, "POST", "/v1/completions", body)
    if r.status != 200:
        raise GptkitError(f"the server answered {r.status}: {r.read()[:300]!r}")
    for raw in iter(r.readline, b""):  # server-sent events, one "data: ..." line each
        if not raw.startswith(b"data: {"):
            continue
        doc = json.loads(raw[6:])
        if doc.get("usage"):
            tokens = doc["usage"]["completion_tokens"]
        elif first is None and doc["choices"] and doc["choices"][0]["text"]:
            first = time.perf_counter() - t0
    return first, time.perf_counter() - t0, tokens, time.process_time() - cpu


def _connect(url: str) -> None:
    """Pool initializer: open the process's connection before anything is timed."""
    with Client.request(url, "GET", "/health") as r:
        r.read()


@contextmanager
def running_server(path: Path, *args: str) -> Iterator[str]:
    """A real ``gptkit serve PATH`` subprocess on a free port; yields its URL."""
    errors = tempfile.TemporaryFile("w+")
    command = [sys.executable, "-m", "gptkit", "serve", str(path), "--port", "0"]
    proc = subprocess.Popen(
        [*command, "--no-access-log", *args], stdout=subprocess.PIPE, stderr=errors, text=True
    )
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline()
        if " on " not in line:
            proc.wait(timeout=30)
            errors.seek(0)
            raise GptkitError(f"gptkit serve did not start:\n{errors.read()[-2000:]}")
        yield line.split(" on ", 1)[1].split()[0]
    finally:
        proc.terminate()
        proc.wait(timeout=30)
        errors.close()


def concurrent_clients(
    url: str, body: dict[str, Any], clients: tuple[int, ...], rounds: int
) -> dict[str, Any]:
    """Aggregate streamed tokens/s and median time to first token of N clients started
    together (``rounds`` rounds each, an untimed warm-up first), each in its own process."""
    import multiprocessing as mp
    from concurrent.futures import ProcessPoolExecutor

    out: dict[str, Any] = {}
    k = max(clients)
    with ProcessPoolExecutor(
        k, mp_context=mp.get_context("spawn"), initializer=_connect, initargs=(url,)
    ) as pool:
        list(pool.map(stream_one, [url] * k, [body] * k))  # warm up every client process
        for n in clients:
            wall, results = 0.0, []
            cpu = server_cpu(url)
            for r in range(rounds):
                bodies = [{**body, "seed": r * n + i} for i in range(n)]
                t = time.perf_counter()
                results += pool.map(stream_one, [url] * n, bodies)
                wall += time.perf_counter() - t
            tokens = sum(x[2] for x in results)
            out[f"clients_{n}_tokens_per_s"] = tokens / wall
            out[f"clients_{n}_first_token_s"] = statistics.median(x[0] or x[1] for x in results)
            out[f"clients_{n}_server_cpu_us_per_token"] = (server_cpu(url) - cpu) / tokens * 1e6
            out[f"clients_{n}_client_cpu_us_per_token"] = sum(x[3] for x in results) / tokens * 1e6
    return out


def server_cpu(url: str) -> float:
    """The server process's CPU seconds so far (all its threads), from ``/health``."""
    with Client.request(url, "GET", "/health") as r:
        return float(json.loads(r.read())["cpu_seconds"])


def runtime_alone(
    path: Path,
    prompt: str,
    max_tokens: int,
    temperature: float,
    batches: tuple[int, ...],
    rounds: int,
) -> dict[str, Any]:
    """The runtime's own tokens/s, no server: ``complete([prompt] * b)`` for each batch b."""
    from gptkit.inference import load

    gen = load(path)
    out: dict[str, Any] = {}
    for b in batches:
        gen.complete([prompt] * b, max_new_tokens=max_tokens, temperature=temperature, seed=0)
        tokens, wall, cpu = 0, 0.0, time.process_time()
        for r in range(rounds):
            t = time.perf_counter()
            done = gen.complete(
                [prompt] * b, max_new_tokens=max_tokens, temperature=temperature, seed=r + 1
            )
            wall += time.perf_counter() - t
            tokens += sum(len(c.tokens) for c in done)
        out[f"batch_{b}_tokens_per_s"] = tokens / wall
        out[f"batch_{b}_cpu_us_per_token"] = (time.process_time() - cpu) / tokens * 1e6
    return out


def serving_overhead(
    path: str | Path,
    *,
    prompt: str = "ROMEO:",
    max_tokens: int = 128,
    temperature: float = 1.0,
    clients: int = 8,
    rounds: int = 3,
    log: Callable[[str], None] = print,
) -> dict[str, Any]:
    """The runtime alone (batch 1 and ``clients``) against the server (1 and ``clients``
    streaming clients), same prompt, budget and temperature; ratios are server / runtime."""
    path = Path(path)
    sizes = (1, clients)
    log(f"runtime alone: batch {sizes[0]} and {sizes[1]}, {max_tokens} tokens ...")
    report: dict[str, Any] = {
        "path": str(path),
        "max_tokens": max_tokens,
        "temperature": temperature,
        "clients": clients,
        **runtime_alone(path, prompt, max_tokens, temperature, sizes, rounds),
    }
    log(f"gptkit serve: 1 and {clients} concurrent streaming clients ...")
    body = {"prompt": prompt, "max_tokens": max_tokens, "temperature": temperature}
    with running_server(path, "--max-tokens", str(max_tokens)) as url:
        report.update(concurrent_clients(url, body, sizes, rounds))
    for n in sizes:
        report[f"server_over_runtime_{n}"] = (
            report[f"clients_{n}_tokens_per_s"] / report[f"batch_{n}_tokens_per_s"]
        )
    report["first_token_n_over_1"] = (
        report[f"clients_{clients}_first_token_s"] / report["clients_1_first_token_s"]
    )
    return report


def format_serving(r: dict[str, Any]) -> str:
    n = r["clients"]
    return "\n".join(
        [
            f"serving {r['path']}: {r['max_tokens']} new tokens per request, "
            f"temperature {r['temperature']}",
            f"    runtime alone, batch 1:       {r['batch_1_tokens_per_s']:9.1f} tok/s",
            f"    server, 1 streaming client:   {r['clients_1_tokens_per_s']:9.1f} tok/s "
            f"({r['server_over_runtime_1']:.0%} of the runtime), first token "
            f"{r['clients_1_first_token_s'] * 1e3:.0f} ms",
            f"    runtime alone, batch {n}:       {r[f'batch_{n}_tokens_per_s']:9.1f} tok/s",
            f"    server, {n} streaming clients:  {r[f'clients_{n}_tokens_per_s']:9.1f} tok/s "
            f"({r[f'server_over_runtime_{n}']:.0%} of the runtime), first token "
            f"{r[f'clients_{n}_first_token_s'] * 1e3:.0f} ms "
            f"({r['first_token_n_over_1']:.2f}x one client's)",
        ]
    )
