"""The serving overhead (``gptkit bench --serve PATH``): what the runtime does on its own, batch 1
and batch N, next to what ``gptkit serve`` delivers to 1 and N concurrent streaming clients, in
one run, so the ratio is the cost of the serving path (HTTP, scheduling, server-sent events).
The two sides are measured in alternation, round by round, so a machine whose speed drifts
moves both sides of a ratio alike.

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
        try:
            return cls._send(url, method, path, data)
        except (OSError, http.client.HTTPException) as exc:
            raise GptkitError(f"the server at {url} does not answer: {exc}") from None

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


def stream_one(
    url: str, body: dict[str, Any], start_at: float | None = None
) -> tuple[float | None, float, int, float, float]:
    """One streaming completion: (seconds to the first text, seconds to the end, tokens, this
    client's CPU seconds, when it ended on ``time.monotonic``'s clock); sent at ``start_at`` on
    that clock (the same in every process) if given, else at once."""
    if start_at is not None:
        time.sleep(max(0.0, start_at - time.monotonic()))
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
    end = time.perf_counter()
    return first, end - t0, tokens, time.process_time() - cpu, time.monotonic()


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


@contextmanager
def client_pool(url: str, k: int) -> Iterator[Any]:
    """``k`` client processes, each with its connection open and one untimed request made."""
    import multiprocessing as mp
    from concurrent.futures import ProcessPoolExecutor

    with ProcessPoolExecutor(
        k, mp_context=mp.get_context("spawn"), initializer=_connect, initargs=(url,)
    ) as pool:
        yield pool


# How far ahead a round's shared start is set: time for the pool to hand the request to
# every client process (8 took 2-6 ms on 2 cores) before any of them sends.
START_AHEAD_S = 0.05


def client_round(
    pool: Any, url: str, body: dict[str, Any], n: int, r: int, prompts: list[str] | None = None
) -> tuple[list, float]:
    """Round ``r``: ``n`` clients send at the same instant (seeds ``r * n + i``; client i
    sends ``prompts[i]`` if given); (results, seconds from that instant to the last one's end).

    The instant is set a little ahead and every client waits for it, so that handing out the
    work (one process after another, on the cores the server runs on) is neither timed nor
    spread over the requests: started as the pool handed them out, 8 requests reached the
    server over 6 ms, while the pool's own work took CPU from it."""
    bodies = [{**body, "seed": r * n + i} for i in range(n)]
    for i, prompt in enumerate((prompts or [])[:n]):
        bodies[i]["prompt"] = prompt
    start = time.monotonic() + START_AHEAD_S
    results = list(pool.map(stream_one, [url] * n, bodies, [start] * n))
    return results, max(x[4] for x in results) - start


def client_figures(n: int, results: list, wall: float, server_cpu_s: float) -> dict[str, Any]:
    """Aggregate tokens/s, median first token, server and client CPU per token of n clients."""
    tokens = sum(x[2] for x in results)
    return {
        f"clients_{n}_tokens_per_s": tokens / wall,
        f"clients_{n}_first_token_s": statistics.median(x[0] or x[1] for x in results),
        f"clients_{n}_server_cpu_us_per_token": server_cpu_s / tokens * 1e6,
        f"clients_{n}_client_cpu_us_per_token": sum(x[3] for x in results) / tokens * 1e6,
    }


def concurrent_clients(
    url: str,
    body: dict[str, Any],
    clients: tuple[int, ...],
    rounds: int,
    prompts: list[str] | None = None,
) -> dict[str, Any]:
    """Aggregate streamed tokens/s and median time to first token of N clients started
    together (``rounds`` rounds each, an untimed warm-up first), each in its own process."""
    out: dict[str, Any] = {}
    k = max(clients)
    with client_pool(url, k) as pool:
        list(pool.map(stream_one, [url] * k, [body] * k))  # warm up every client process
        for n in clients:
            wall, results = 0.0, []
            cpu = server_cpu(url)
            for r in range(rounds):
                got, seconds = client_round(pool, url, body, n, r, prompts)
                results += got
                wall += seconds
            out.update(client_figures(n, results, wall, server_cpu(url) - cpu))
    return out


def server_cpu(url: str) -> float:
    """The server process's CPU seconds so far (all its threads), from ``/health``."""
    with Client.request(url, "GET", "/health") as r:
        return float(json.loads(r.read())["cpu_seconds"])


# Each side is woken before its timed round, the same way: the runtime by an untimed short
# completion, the server and the client processes (idle during the runtime's round) by one
# untimed 1-token request per client; and after a runtime round, onnxruntime's worker threads,
# which spin on for a while, go quiet first. Measured without these: one client's first token
# 3.1-4.6 ms instead of 2.2-3.0, and the runtime after an idle pause 10-25% slower at batch 1.
SETTLE_S = 0.2


def distinct_prompts(tokenizer: Any, prompt: str, n: int) -> list[str]:
    """``prompt`` and ``n - 1`` others of as many tokens, its last token changed: clients
    sending one prompt would share one prefill (``DecodeBatch._prefill``), which users with
    prompts of their own do not. A variant must come back as the same tokens when encoded;
    where fewer than ``n`` do, prompts repeat."""
    ids = tokenizer.encode(prompt)
    out = [prompt]
    for token in range(min(tokenizer.vocab_size, 4096)):
        if len(out) == n or not ids:
            break
        variant = [*ids[:-1], token]
        text = tokenizer.decode(variant)
        if token != ids[-1] and text not in out and tokenizer.encode(text) == variant:
            out.append(text)
    return [out[i % len(out)] for i in range(n)]


def runtime_round(
    gen: Any, prompts: list[str], b: int, options: dict[str, Any], seed: int
) -> tuple:
    """One ``complete(prompts[:b])``: (tokens, seconds, CPU seconds)."""
    t, cpu = time.perf_counter(), time.process_time()
    done = gen.complete(prompts[:b], seed=seed, **options)
    wall, cpu = time.perf_counter() - t, time.process_time() - cpu
    return sum(len(c.tokens) for c in done), wall, cpu


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
    streaming clients), same prompts, budget and temperature; ratios are server / runtime.
    Each row (and client) has a prompt of its own, as long as ``prompt`` (``distinct_prompts``).

    The two are measured in alternation, round by round (runtime batch 1, server 1 client,
    runtime batch N, server N clients, and again), so that a machine whose speed drifts during
    the run (a shared one) moves both sides of each ratio alike. The runtime runs in this
    process while the server, idle, waits; the clients are separate processes."""
    from gptkit.inference import load

    path, sizes = Path(path), (1, clients)
    options = {"max_new_tokens": max_tokens, "temperature": temperature}
    body = {"prompt": prompt, "max_tokens": max_tokens, "temperature": temperature}
    ping = {**body, "max_tokens": 1}
    log(
        f"runtime alone (batch 1 and {clients}) and gptkit serve (1 and {clients} streaming "
        f"clients), {rounds} round{'s' * (rounds != 1)} each, in alternation, "
        f"{max_tokens} tokens ..."
    )
    gen = load(path)
    prompts = distinct_prompts(gen.tokenizer, prompt, clients)
    runtime = {n: [0, 0.0, 0.0] for n in sizes}  # tokens, seconds, CPU seconds
    served: dict[int, tuple[list, float, float]] = {n: ([], 0.0, 0.0) for n in sizes}
    with (
        running_server(path, "--max-tokens", str(max_tokens)) as url,
        client_pool(url, clients) as pool,
    ):
        for n in sizes:  # untimed warm-ups: each batch shape, every client process
            runtime_round(gen, prompts, n, options, seed=0)
        list(pool.map(stream_one, [url] * clients, [body] * clients))
        for r in range(rounds):
            for n in sizes:
                gen.complete(prompts[:n], max_new_tokens=8, seed=0)  # untimed, as the ping
                tokens, wall, cpu = runtime_round(gen, prompts, n, options, seed=r + 1)
                runtime[n] = [runtime[n][0] + tokens, runtime[n][1] + wall, runtime[n][2] + cpu]
                time.sleep(SETTLE_S)  # the runtime's spinning threads go quiet first
                list(pool.map(stream_one, [url] * n, [ping] * n))  # untimed: wake every part
                before = server_cpu(url)
                results, wall = client_round(pool, url, body, n, r, prompts)
                old = served[n]
                served[n] = (old[0] + results, old[1] + wall, old[2] + server_cpu(url) - before)
    report: dict[str, Any] = {
        "path": str(path),
        "max_tokens": max_tokens,
        "temperature": temperature,
        "clients": clients,
        "rounds": rounds,
    }
    for n in sizes:
        tokens, wall, cpu = runtime[n]
        report[f"batch_{n}_tokens_per_s"] = tokens / wall
        report[f"batch_{n}_cpu_us_per_token"] = cpu / tokens * 1e6
        report.update(client_figures(n, *served[n]))
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
            f"{r['clients_1_first_token_s'] * 1e3:.1f} ms",
            f"    runtime alone, batch {n}:       {r[f'batch_{n}_tokens_per_s']:9.1f} tok/s",
            f"    server, {n} streaming clients:  {r[f'clients_{n}_tokens_per_s']:9.1f} tok/s "
            f"({r[f'server_over_runtime_{n}']:.0%} of the runtime), first token "
            f"{r[f'clients_{n}_first_token_s'] * 1e3:.1f} ms "
            f"({r['first_token_n_over_1']:.2f}x one client's)",
            f"    CPU per token, 1 / {n} clients: server "
            f"{r['clients_1_server_cpu_us_per_token']:.0f} / "
            f"{r[f'clients_{n}_server_cpu_us_per_token']:.0f} us, clients "
            f"{r['clients_1_client_cpu_us_per_token']:.0f} / "
            f"{r[f'clients_{n}_client_cpu_us_per_token']:.0f} us",
        ]
    )
