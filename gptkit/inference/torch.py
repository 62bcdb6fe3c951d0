"""The torch backend of the decoding loop: a GPT in this process, with the static cache when
every component supports it (and, on CUDA, each decode step replayed from a CUDA graph); and
``open_run``, the parts of an ``Inference`` over a run."""

from __future__ import annotations

import os
import warnings
import weakref
from collections.abc import Sequence
from contextlib import nullcontext
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode

from gptkit.components.attention import StaticKV
from gptkit.inference.cache import StaticCache, drop_slots, join_rows, keep_rows
from gptkit.model import GPT


class TorchBackend:
    """Runs a GPT for the decoding loop. The cache is a ``StaticCache`` (preallocated, updated
    in place) when every component supports it, else the model's concatenated (keys, values).

    With the static cache, ``graphs`` (default: on CUDA) runs each decode step as a
    ``GraphedStep``: on a GPU a small model's step is a few hundred kernel launches, each
    costing more than its work; a replayed CUDA graph is one."""

    capture_after = 3  # steps a cache's buffers serve, run directly, before a graph is made

    def __init__(
        self,
        model: GPT,
        device: str | torch.device = "cpu",
        static: bool | None = None,
        graphs: bool | None = None,
    ) -> None:
        self.model = model.eval()
        self.device = torch.device(device)
        self.max_seq_len = model.spec.max_seq_len
        self.static = model.static_cache if static is None else static and model.static_cache
        if graphs is None:  # on CUDA, unless GPTKIT_CUDA_GRAPHS=0 turns them off
            graphs = self.device.type == "cuda" and os.environ.get("GPTKIT_CUDA_GRAPHS") != "0"
        self.graphs = self.static and graphs
        self.graphs_off = ""  # why the graphed steps were turned off, if they were
        self.step: GraphedStep | None = None  # the decode step for the current cache buffers
        self._seen: tuple[list[weakref.ref], int] = ([], 0)  # buffers, steps they served

    @torch.inference_mode()
    def __call__(self, ids, positions, key_mask, past):
        idx = torch.from_numpy(ids).to(self.device)
        pos = torch.from_numpy(positions).to(self.device)
        # No mask at all when nothing is padded: the fused attention fast path applies.
        mask = None if key_mask.all() else torch.from_numpy(key_mask).to(self.device)
        if past is None or not self.static:
            out = self.model(
                idx, positions=pos, past_key_values=past, key_mask=mask, last_only=True
            )
            if self.static:  # the prefill fills a fresh preallocated cache
                return out.logits[:, -1].float().cpu().numpy(), StaticCache.from_prefill(
                    _flat(out.past_key_values), self.max_seq_len
                )
            return out.logits[:, -1].float().cpu().numpy(), out.past_key_values
        if self.graphs and ids.shape[1] == 1:
            logits = self._graphed(ids, positions, key_mask, past)
            if logits is not None:
                return logits, past
        out = self.model(
            idx, positions=pos, past_key_values=_views(past), key_mask=mask, last_only=True
        )
        past.write(_flat(out.past_key_values))
        return out.logits[:, -1].float().cpu().numpy(), past

    def _graphed(
        self, ids: np.ndarray, positions: np.ndarray, key_mask: np.ndarray, past: StaticCache
    ) -> np.ndarray | None:
        """One decode step by the ``GraphedStep`` for ``past``'s buffers, captured once they
        have served ``capture_after`` steps; None: this step runs directly. A step that
        cannot be captured, or whose replay disagrees with the model run directly, turns
        graphs off for this backend (with a warning saying why)."""
        on_device = torch.cuda.device(self.device) if self.device.type == "cuda" else nullcontext()
        with on_device:
            if self.step is not None and self.step.serves(past):
                return self.step(ids, positions, key_mask, past)
            self.step = None  # its graph and memory go before another is captured
            if not self._capture_due(past):
                return None
            length = past.length
            try:
                step = GraphedStep(self.model, past, capture=self.device.type == "cuda")
                logits = step.checked(ids, positions, key_mask, past)
            except (RuntimeError, GraphError) as exc:
                past.length = length  # the step is taken again, directly
                cause = exc.__context__ or exc  # a capture that failed to end: its cause
                warnings.warn(f"decoding without CUDA graphs: {cause}", stacklevel=3)
                self.graphs, self.graphs_off = False, str(cause)
                return None
        self.step = step
        return logits

    def _capture_due(self, past: StaticCache) -> bool:
        """Have ``past``'s buffers served ``capture_after`` steps (run directly)? Rows join
        and leave often in a server, each time with new buffers, and a capture costs a
        synchronisation, warm-up steps and the capture itself."""
        seen, count = self._seen
        if not _same_buffers(seen, past):
            seen, count = [weakref.ref(b) for b in past.buffers], 0
        self._seen = (seen, count + 1)
        return count + 1 > self.capture_after

    @torch.inference_mode()
    def prompt_logits(self, ids: list[int]) -> np.ndarray:
        """The logits (T, V) at every position of one prompt (no cache kept)."""
        idx = torch.tensor([ids], device=self.device)
        return self.model(idx).logits[0].float().cpu().numpy()

    keep_rows = staticmethod(keep_rows)
    join_rows = staticmethod(join_rows)
    drop_slots = staticmethod(drop_slots)


# What reads a tensor's value on the host (``.item()``, ``bool(t)``, a data-dependent shape):
# on a GPU each waits for the device, and none may run in a step captured as a CUDA graph.
# Seen from the dispatcher on any device; the copies to the host below it are seen as the
# tensor methods called (on the CPU ``.cpu()`` copies nothing, so the dispatcher never sees it).
HOST_COPIES = ("Tensor.tolist", "Tensor.numpy", "Tensor.cpu", "Tensor.__array__")
HOST_READS = (
    "aten::item",
    "aten::_local_scalar_dense",
    "aten::is_nonzero",
    "aten::equal",
    "aten::nonzero",
    "aten::masked_select",
    "aten::_unique2",
    "aten::repeat_interleave.self_Tensor",
    "aten::repeat_interleave.Tensor",
)


class HostReads(TorchDispatchMode):
    """Records the host reads (``HOST_READS``, and the copies to the host ``HOST_COPIES``) of
    the torch operations run in this thread while it is active:
    ``with HostReads() as reads: ...; reads.found``."""

    def __init__(self) -> None:
        super().__init__()
        self.found: list[str] = []
        self._copies = _HostCopies(self.found)

    def __enter__(self) -> HostReads:
        self._copies.__enter__()
        return super().__enter__()

    def __exit__(self, *exc: Any) -> None:
        try:
            super().__exit__(*exc)
        finally:
            self._copies.__exit__(*exc)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func._schema.name
        if name in HOST_READS or f"{name}.{func._schema.overload_name}" in HOST_READS:
            self.found.append(name)
        return func(*args, **(kwargs or {}))


class _HostCopies(TorchFunctionMode):
    """``HostReads``' watch on the tensor methods that copy to the host (``HOST_COPIES``)."""

    def __init__(self, found: list[str]) -> None:
        super().__init__()
        self.found = found

    def __torch_function__(self, func, types, args=(), kwargs=None):
        name = f"Tensor.{getattr(func, '__name__', '')}"
        if name in HOST_COPIES:
            self.found.append(name)
        return func(*args, **(kwargs or {}))


class GraphError(Exception):
    """A decode step that cannot be replayed from a CUDA graph (see ``GraphedStep``)."""


class GraphedStep:
    """One decode step (one new token per row) over a static cache's whole buffers, with
    fixed shapes, so that it can be captured as a CUDA graph and replayed.

    Its inputs are tensors of its own, written before each replay: the new tokens, their
    positions, the key mask laid out over every slot (B, capacity + 1) and the first free slot
    (a tensor, so the graph does not bake it in). The model attends over all slots, those not
    in use masked (``StaticKV``'s contract), and the new keys and values are written into the
    cache's own buffers at that slot inside the step: nothing is copied per step but the
    inputs and the logits. A step serves while the cache keeps its buffers; they are replaced
    when rows leave or join (``serves``).

    ``capture=False`` runs the same step directly (the CPU, and tests of its inputs' layout).
    """

    def __init__(self, model: GPT, cache: StaticCache, capture: bool = True) -> None:
        # Weak references: a step kept after its batch has ended does not keep that batch's
        # cache (and it replays only for a cache whose buffers are these, alive: ``serves``).
        self.model, self.cache_refs = model, [weakref.ref(b) for b in cache.buffers]
        B, S = int(cache.buffers[0].shape[0]), cache.capacity
        device = cache.buffers[0].device
        self.ids = torch.zeros(B, 1, dtype=torch.long, device=device)
        self.positions = torch.zeros(B, 1, dtype=torch.long, device=device)
        self.key_mask = torch.ones(B, S + 1, dtype=torch.bool, device=device)
        self.slot = torch.tensor(cache.length, device=device)
        self.graph: Any = None
        self.logits: torch.Tensor | None = None  # the graph's output, when captured
        if capture:
            self._capture()

    def serves(self, cache: StaticCache) -> bool:
        return _same_buffers(self.cache_refs, cache)

    def run(self) -> torch.Tensor:
        """The step itself: the model over every slot, the new keys and values written in."""
        buffers = [r() for r in self.cache_refs]  # alive: run only while the cache is
        assert all(b is not None for b in buffers), "the cache this step served is gone"
        shared: dict = {}  # one score mask for every layer (see StaticKV.shared)
        views = [StaticKV(k, v, self.slot, shared) for k, v in zip(buffers[0::2], buffers[1::2])]
        out = self.model(
            self.ids,
            positions=self.positions,
            past_key_values=views,
            key_mask=self.key_mask,
            last_only=True,
        )
        for buf, new in zip(buffers, _flat(out.past_key_values)):
            buf.index_copy_(2, self.slot.view(1), new)
        return out.logits[:, -1]

    def _capture(self) -> None:
        """Warm up on a side stream (as CUDA graph capture asks), then capture. A step that
        reads on the host is refused before any capture (a failed capture can leave the
        allocator and the thread's stream in a state nothing should run in). The first free
        slot is written by these runs too, with whatever they compute: the real step writes
        it again before anything reads it."""
        current = torch.cuda.current_stream()
        side = torch.cuda.Stream()
        side.wait_stream(current)
        with torch.cuda.stream(side):
            with HostReads() as reads:
                self.run()
            if reads.found:
                raise GraphError(
                    f"the decode step reads {sorted(set(reads.found))} on the host (a "
                    "component's attention or positional scheme)"
                )
            self.run()
        current.wait_stream(side)
        self.graph = torch.cuda.CUDAGraph()
        try:
            # Thread-local: another thread's CUDA work meanwhile (a server's other requests)
            # is not captured and does not break the capture.
            with torch.cuda.graph(self.graph, capture_error_mode="thread_local"):
                self.logits = self.run()
        finally:
            torch.cuda.set_stream(current)  # also when ending the capture failed

    def _set_inputs(
        self, ids: np.ndarray, positions: np.ndarray, key_mask: np.ndarray, cache: StaticCache
    ) -> None:
        L = cache.length
        self.ids.copy_(torch.from_numpy(ids))
        self.positions.copy_(torch.from_numpy(positions))
        mask = np.zeros(tuple(self.key_mask.shape), dtype=bool)
        mask[:, :L] = key_mask[:, :L]  # the slots in use; the rest stay masked
        mask[:, -1] = key_mask[:, L]  # the new token
        self.key_mask.copy_(torch.from_numpy(mask))
        self.slot.fill_(L)

    def _replay(self) -> np.ndarray:
        """The step on the inputs set: replayed (or, not captured, run)."""
        if self.graph is not None:
            self.graph.replay()
            logits = self.logits
        else:
            logits = self.run()
        assert logits is not None
        return logits.float().cpu().numpy()

    def __call__(
        self, ids: np.ndarray, positions: np.ndarray, key_mask: np.ndarray, cache: StaticCache
    ) -> np.ndarray:
        """The next-token logits (B, V) of one decode step; the cache grows by it."""
        self._set_inputs(ids, positions, key_mask, cache)
        logits = self._replay()
        cache.length += 1
        return logits

    def checked(
        self, ids: np.ndarray, positions: np.ndarray, key_mask: np.ndarray, cache: StaticCache
    ) -> np.ndarray:
        """A step, checked against the model run directly on the same inputs (both write the
        same keys and values into the same slot): a captured graph that replays something
        else raises ``GraphError`` instead of decoding wrong tokens (the cache unchanged)."""
        self._set_inputs(ids, positions, key_mask, cache)
        direct = self.run().float().cpu().numpy()
        logits = self._replay()
        err = float(np.abs(logits - direct).max())
        if not err <= 1e-3 * max(1.0, float(np.abs(direct).max())):
            raise GraphError(f"the replayed step's logits differ from the model's by {err:.3g}")
        cache.length += 1
        return logits


def _same_buffers(refs: list[weakref.ref], cache: StaticCache) -> bool:
    """Are ``cache``'s buffers the (live) tensors ``refs`` point to?"""
    return len(refs) == len(cache.buffers) and all(r() is b for r, b in zip(refs, cache.buffers))


def _flat(pairs: list[tuple[torch.Tensor, torch.Tensor]]) -> list[torch.Tensor]:
    """Per-layer (keys, values) as the cache's flat list: layer 0 keys, layer 0 values, ..."""
    return [x for pair in pairs for x in pair]


def _views(cache: StaticCache) -> list[StaticKV]:
    """Each layer's slots in use, as views of the cache's buffers (no copy)."""
    L, buffers = cache.length, cache.buffers
    position = torch.tensor(L, device=buffers[0].device)
    shared: dict = {}  # one score mask for every layer of this step (see StaticKV.shared)
    return [
        StaticKV(k[:, :, :L], v[:, :, :L], position, shared)
        for k, v in zip(buffers[0::2], buffers[1::2])
    ]


def open_run(
    run: str | Path,
    checkpoint: str = "latest",
    overrides: Sequence[str] = (),
    device: str = "cpu",
) -> dict[str, Any]:
    """The parts of an ``Inference`` over a run directory's model, tokenizer and sampler
    (``overrides``: --set style): see ``gptkit.load``."""
    from gptkit.registry.registry import load_registry
    from gptkit.store.rundir import load_run

    loaded = load_run(run, checkpoint=checkpoint, overrides=overrides, device=device)
    plugins = tuple(loaded.spec.plugins)
    return {
        "backend": TorchBackend(loaded.model, device),
        "tokenizer": loaded.tokenizer,
        "sampler": loaded.spec.sampler,
        "registry": lambda kind: load_registry(plugins),
        "path": Path(run),
        "plugins": plugins,
    }


__all__ = ["GraphedStep", "HostReads", "TorchBackend", "open_run"]
