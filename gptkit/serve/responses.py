"""The ASGI side of an answer: a streamed one (server-sent events, headers with the first
events, the end of the body with the last, sent whole to an HTTP/1.0 client), the watch for its
client going away, and a request's clean-up that runs once whoever ends it."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import AsyncIterator, Callable
from typing import Any

from fastapi.responses import StreamingResponse
from starlette.requests import ClientDisconnect
from starlette.types import Receive

from gptkit.serve.schemas import CLIENT_LEFT


class Once:
    """A request's clean-up (cancel its rows, release its admission): runs once, whoever
    calls it first."""

    def __init__(self, action: Callable[[], object]) -> None:
        self.action, self.ran = action, False
        self._lock = threading.Lock()

    def __call__(self) -> None:
        with self._lock:
            if self.ran:
                return
            self.ran = True
        self.action()


class EventStream(StreamingResponse):
    """A streamed answer (server-sent events) whose clean-up runs however the response ends,
    also when the client leaves before the first event (then the event generator never starts,
    and its own ``finally`` never runs).

    The headers go out with the first events and the end of the body with the last (two writes
    fewer per request than Starlette's), and the client leaving is watched by one task."""

    def __init__(self, content: AsyncIterator[tuple[str, bool]], done: Once) -> None:
        # Not cached, not buffered by a proxy (nginx holds a stream's events back otherwise).
        headers = {"cache-control": "no-cache", "x-accel-buffering": "no"}
        super().__init__(content, media_type="text/event-stream", headers=headers)
        self.done = done

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        # An ASGI 2.4 server raises OSError from a send to a client that left; an older one
        # (uvicorn says 2.3) drops the send, so the client's leaving is watched for.
        spec = tuple(map(int, scope.get("asgi", {}).get("spec_version", "2.0").split(".")))
        leaving = Leaving(receive) if spec < (2, 4) else None
        if scope.get("http_version") == "1.0":
            send = WholeBody(send)

        async def deliver(message: dict[str, Any]) -> None:
            try:
                await send(message)
            except OSError:
                if leaving is not None:
                    raise
                scope[CLIENT_LEFT] = True
                raise ClientDisconnect() from None

        start: dict[str, Any] | None = {
            "type": "http.response.start",
            "status": self.status_code,
            "headers": self.raw_headers,
        }
        try:  # the events end with one marked last (_events): it ends the body
            async for text, end in self.body_iterator:  # type: ignore[misc]
                if start is not None:
                    await deliver(start)
                    start = None
                await deliver(
                    {"type": "http.response.body", "body": text.encode(), "more_body": not end}
                )
        except asyncio.CancelledError:
            if leaving is None or not leaving.caused():
                raise  # cancelled by the server (shutting down), not by the client leaving
            scope[CLIENT_LEFT] = True  # the access log says 499, also after the headers went
            if start is not None:  # never answered: the access log says so (the send is dropped)
                await send({"type": "http.response.start", "status": 499, "headers": []})
        finally:
            if leaving is not None:
                leaving.stop()
            self.done()


class WholeBody:
    """An ASGI ``send`` that holds a response back and sends it whole, with its length: HTTP/1.0
    has no chunked transfer encoding, which uvicorn's httptools protocol would use for a
    streamed body whatever the request's version (an HTTP/1.0 client would read the chunk
    sizes as text)."""

    def __init__(self, send: Any) -> None:
        self.send = send
        self.start: dict[str, Any] | None = None
        self.body: list[bytes] = []

    async def __call__(self, message: dict[str, Any]) -> None:
        if message["type"] == "http.response.start":
            self.start = message
            return
        self.body.append(message.get("body", b""))
        if message.get("more_body", False) or self.start is None:
            return
        body = b"".join(self.body)
        headers = [(k, v) for k, v in self.start.get("headers", []) if k != b"content-length"]
        headers.append((b"content-length", str(len(body)).encode()))
        await self.send({**self.start, "headers": headers})
        await self.send({"type": "http.response.body", "body": body, "more_body": False})


class Leaving:
    """Watches the request's ASGI channel for the client going away and then cancels the task
    answering it; ``caused()`` tells that cancellation from the server's own. ``stop`` when the
    answer is done."""

    def __init__(self, receive: Receive) -> None:
        self.left = False
        self._answering = asyncio.current_task()
        self._watcher = asyncio.ensure_future(self._watch(receive))

    async def _watch(self, receive: Receive) -> None:
        while (await receive())["type"] != "http.disconnect":
            pass
        self.left = True
        if self._answering is not None:
            self._answering.cancel()

    def caused(self) -> bool:
        """Whether the cancellation being handled is this watcher's alone; it is then undone
        (Python 3.11+ counts a task's pending cancellations)."""
        if not self.left:
            return False
        uncancel = getattr(self._answering, "uncancel", None)
        return uncancel is None or uncancel() == 0

    def stop(self) -> None:
        self._watcher.cancel()
