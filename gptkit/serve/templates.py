"""Chat templates rendered away from the server: in a worker process with a deadline, a memory
ceiling and a size bound on what comes back.

A chat template is a program (Jinja). The sandbox stops it from reaching Python's internals,
but not from looping for hours or building a gigabyte string; on the event loop either would
stop every other client from being answered. So the server sends (template, messages) to one
long-lived worker process and waits for the answer off the event loop: past ``timeout_s`` the
worker is killed (and started again for the next request), past ``memory_bytes`` its
allocation fails, and a prompt longer than ``max_chars`` is refused. Each is a ``TemplateError``
for that request (400); other requests and ``/health`` are answered meanwhile.
"""

from __future__ import annotations

import multiprocessing as mp
import threading
from multiprocessing.connection import Connection
from typing import Any


class TemplateError(Exception):
    """A chat template that failed, ran too long, used too much memory or said too much."""


def _limit_memory(memory_bytes: int) -> None:
    try:
        import resource

        resource.setrlimit(resource.RLIMIT_AS, (memory_bytes, memory_bytes))
    except (ImportError, ValueError, OSError):  # not on this platform: the deadline still holds
        pass


def _worker(conn: Connection, memory_bytes: int, max_chars: int) -> None:
    """The render loop in the worker process: (template, messages) in, ("ok", prompt) or
    ("error", message) out, until the pipe closes."""
    from gptkit.serve.render import render_chat

    _limit_memory(memory_bytes)
    render_chat("{{ messages[0]['content'] }}", [{"role": "user", "content": ""}])  # imports
    conn.send(("ready", ""))  # the render deadline starts after this: not the start-up's
    while True:
        try:
            template, messages = conn.recv()
        except (EOFError, OSError):
            return
        try:
            prompt = render_chat(template, messages)
            if len(prompt) > max_chars:
                reply = ("error", f"the rendered prompt is over {max_chars} characters")
            else:
                reply = ("ok", prompt)
        except MemoryError:
            reply = ("error", "rendering used more memory than a chat template may")
        except Exception as exc:  # the template's own error, reported to its request
            reply = ("error", f"{type(exc).__name__}: {exc}")
        del template, messages
        conn.send(reply)


class TemplateRenderer:
    """Renders chat templates in a worker process (started on first use); thread-safe."""

    def __init__(
        self,
        timeout_s: float = 2.0,
        max_chars: int = 64 * 1024,
        memory_bytes: int = 1 << 30,
        start_timeout_s: float = 60.0,
    ) -> None:
        self.timeout_s, self.max_chars, self.memory_bytes = timeout_s, max_chars, memory_bytes
        self.start_timeout_s = start_timeout_s
        self._lock = threading.Lock()
        self._proc: Any = None
        self._conn: Connection | None = None

    def _start(self) -> Connection:
        """A new worker, once it is ready to render (a busy machine may take seconds to start
        a Python process; that time is not taken from the first render's deadline)."""
        ctx = mp.get_context("spawn")  # nothing of the server (threads, sockets) is inherited
        ours, theirs = ctx.Pipe()
        self._proc = ctx.Process(
            target=_worker,
            args=(theirs, self.memory_bytes, self.max_chars),
            name="gptkit-chat-template",
            daemon=True,
        )
        self._proc.start()
        theirs.close()
        self._conn = ours
        if not ours.poll(self.start_timeout_s) or ours.recv() != ("ready", ""):
            self._stop()
            raise TemplateError(
                f"the chat template worker did not start in {self.start_timeout_s:g} s"
            )
        return ours

    def _stop(self) -> None:
        if self._proc is not None:
            self._proc.kill()
            self._proc.join(5)
        if self._conn is not None:
            self._conn.close()
        self._proc = self._conn = None

    def render(self, template: str, messages: list[dict[str, Any]]) -> str:
        """The prompt, or TemplateError; blocks (call it from a thread, not the event loop)."""
        with self._lock:
            try:
                conn = self._conn or self._start()
                conn.send((template, messages))
                if not conn.poll(self.timeout_s):
                    self._stop()  # a runaway template: the worker goes, a new one comes
                    raise TemplateError(f"rendering took longer than {self.timeout_s:g} s")
                kind, value = conn.recv()
            except (EOFError, OSError, BrokenPipeError):  # the worker died (e.g. killed)
                self._stop()
                raise TemplateError("the chat template worker stopped while rendering") from None
        if kind == "error":
            raise TemplateError(value)
        return value
