"""What the trainer shows while it runs.

On a terminal: one live bar that always carries step, loss, learning rate, tokens/s and one
ETA, updated every step (where the loss is read only at log steps, on a GPU with fused AdamW,
the step count moves every step and the rest at each read); evaluation lines and samples are
printed above it and stay in the scrollback (nanoGPT style). Elsewhere (a log file, CI): a
plain line every ``log_every`` steps.
"""

from __future__ import annotations

import os
import sys
import time
from collections.abc import Callable
from typing import Any


def format_eta(seconds: float) -> str:
    seconds = int(max(0, seconds))
    hours, rest = divmod(seconds, 3600)
    return f"{hours}h{rest // 60:02d}m" if hours else f"{rest // 60}m{rest % 60:02d}s"


def one_line(text: str, width: int = 200) -> str:
    """A sample on a single line: newlines shown as '⏎', cut at ``width`` characters."""
    flat = text.replace("\r", "").replace("\n", "⏎")
    return flat if len(flat) <= width else flat[: width - 1] + "…"


def _silence_stdout() -> None:
    """Send whatever is still printed to standard output nowhere: it was closed (``| head``,
    a terminal gone), and each later write, the interpreter's last flush included, would
    fail."""
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        os.close(devnull)
    except (OSError, ValueError):  # no file descriptor behind sys.stdout (a notebook)
        pass


class Progress:
    """A live bar on a terminal; plain lines every ``log_every`` steps otherwise.

    If standard output goes away (a pipe whose reader ended, a closed terminal), nothing more
    is printed and ``on_lost`` is called once: the trainer stops at the next step with a
    checkpoint, as on Ctrl-C."""

    def __init__(
        self,
        total: int,
        start: int,
        enabled: bool = True,
        quiet: bool = False,
        on_lost: Callable[[], None] | None = None,
    ) -> None:
        self.total, self.start = total, start
        self.on_lost = on_lost
        self.quiet = quiet  # other ranks under torchrun: one voice, rank 0's
        self.live = enabled and not quiet and sys.stderr.isatty()
        self._tps: float | None = None
        self._bar = None
        self._drawn = time.monotonic()
        if self.live:
            from rich.progress import BarColumn, MofNCompleteColumn, TextColumn
            from rich.progress import Progress as RichProgress

            self._bar = RichProgress(
                TextColumn("train"),
                BarColumn(),
                MofNCompleteColumn(),
                TextColumn("{task.fields[info]}"),
                transient=False,
            )
            first = "starting: waiting for the first step" if not start else "resuming"
            self._task = self._bar.add_task("train", total=total, completed=start, info=first)
            self._bar.start()

    def step(
        self, step: int, loss: float, lr: float, tokens: int, seconds: float, plain_line: bool
    ) -> None:
        """One finished optimizer step: ``tokens`` processed in ``seconds``."""
        tps = tokens / max(seconds, 1e-9)
        # A smoothed rate, so the ETA does not jump with every step's noise.
        self._tps = tps if self._tps is None else 0.9 * self._tps + 0.1 * tps
        eta = (self.total - step) * tokens / max(self._tps, 1e-9)
        info = f"loss {loss:.4f} | lr {lr:.2e} | {self._tps:,.0f} tok/s | eta {format_eta(eta)}"
        if self._bar is not None:
            bar, task, due = self._bar, self._task, self._redraw_due()
            self._guard(lambda: bar.update(task, completed=step, info=info, refresh=due))
        elif plain_line and not self.quiet:
            self._say(f"step {step:>6}/{self.total} | {info}")

    def advance(self, step: int) -> None:
        """A step taken whose loss is not read yet (on a GPU, until a log step): the bar's
        count moves on; loss, rate and ETA are shown when it is read."""
        if self._bar is not None:
            bar, task, due = self._bar, self._task, self._redraw_due()
            self._guard(lambda: bar.update(task, completed=step, refresh=due))

    def _redraw_due(self) -> bool:
        """Draw at least every 0.1 s of training from here, not only by rich's refresh
        thread, which a busy machine can starve for a whole logging interval."""
        now = time.monotonic()
        due = now - self._drawn >= 0.1
        self._drawn = now if due else self._drawn
        return due

    def print(self, text: str) -> None:
        """A line for the scrollback, above the bar."""
        if self.quiet:
            return
        if self._bar is not None:
            bar = self._bar
            self._guard(lambda: bar.console.print(text, markup=False, highlight=False))
        else:
            self._say(text)

    def _say(self, line: str) -> None:
        if not self.quiet:
            self._guard(lambda: print(line, flush=True))

    def _guard(self, write: Callable[[], None]) -> None:
        """Run ``write``; if standard output has gone away (BrokenPipeError, EIO), print
        nothing more and tell ``on_lost``, once."""
        try:
            write()
        except (OSError, SystemExit):  # rich turns a broken pipe into SystemExit(1)
            bar, self._bar, self.quiet = self._bar, None, True
            _silence_stdout()
            if bar is not None:
                try:
                    bar.stop()  # its last drawing goes nowhere now
                except (OSError, SystemExit):
                    pass
            if self.on_lost is not None:
                self.on_lost()

    def close(self) -> None:
        if self._bar is not None:
            self._guard(self._bar.stop)


def progress_sample(
    model: Any, tokenizer: Any, sampler: Any, n_tokens: int, seed: int, prompt: str = "\n"
) -> str:
    """A short sample for progress reports (the model is put back in its previous mode)."""
    from gptkit.inference.decoding import decode_loop
    from gptkit.inference.torch import TorchBackend

    was_training = model.training
    try:
        try:
            prompt_ids_ok = bool(tokenizer.encode(prompt))
        except Exception:
            prompt_ids_ok = False
        # No CUDA graphs mid-training: each capture synchronises and empties torch's cached
        # memory, and under FSDP it would record the parameter gathers.
        out = decode_loop(
            TorchBackend(model, next(model.parameters()).device, graphs=False),
            tokenizer,
            [prompt if prompt_ids_ok else ""],
            sampler,
            max_new_tokens=n_tokens,
            seed=seed,
        )
        return out[0].text
    finally:
        model.train(was_training)
