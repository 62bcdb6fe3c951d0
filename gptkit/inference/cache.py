"""The KV cache between decoding steps, for both backends (torch tensors or numpy arrays).

A cache is either the **static** one, ``StaticCache`` (preallocated buffers written in place,
for components that support it), or the **concatenating** one: a list of per-layer arrays
(numpy, the ONNX graph's inputs) or ``(keys, values)`` pairs (torch, the model's
``past_key_values``) that the model returns grown by the new tokens. ``keep_rows``,
``join_rows`` and ``drop_slots`` serve the decoding loop's continuous batching for either kind.

Every buffer is (B, H_kv, S, hd); nothing here imports torch.
"""

from __future__ import annotations

from typing import Any

import numpy as np


def _zeros(like: Any, shape: tuple[int, ...]) -> Any:
    """A zero buffer of ``shape`` with ``like``'s dtype (and device, for a tensor)."""
    if isinstance(like, np.ndarray):
        return np.zeros(shape, dtype=like.dtype)
    return like.new_zeros(shape)


def _take_rows(x: Any, rows: list[int]) -> Any:
    """The given batch rows of ``x``, as a contiguous copy."""
    return np.ascontiguousarray(x[rows]) if isinstance(x, np.ndarray) else x[rows]


def _stack(a: Any, b: Any, used: tuple[int, int], shifts: tuple[int, int], width: int) -> Any:
    """``a``'s rows then ``b``'s in one buffer of ``width`` or more slots; each one's first
    ``used`` slots moved right by its shift (the slots before stay zero: left padding)."""
    capacity = max(a.shape[2], b.shape[2], width)
    buf = _zeros(a, (a.shape[0] + b.shape[0], a.shape[1], capacity, a.shape[3]))
    buf[: a.shape[0], :, shifts[0] : width] = a[:, :, : used[0]]
    buf[a.shape[0] :, :, shifts[1] : width] = b[:, :, : used[1]]
    return buf


class StaticCache:
    """Preallocated keys and values: one (B, H_kv, capacity, hd) buffer per cache input, in
    the graph's order (layer 0 key, layer 0 value, layer 1 key, ...), filled in place. Slot j
    holds the token at index j of the left-padded batch; the first ``length`` slots are in
    use. The capacity doubles when needed (a step at a short context does not pay for the
    longest one), never past the limit given to ``reserve``.

    ``binding`` is free for a backend to memoise its own view of the buffers (onnxruntime's
    IO binding and values over the same memory); it is cleared whenever the buffers are
    replaced.
    """

    def __init__(self, buffers: list[Any], length: int = 0) -> None:
        self.buffers = buffers
        self.length = length
        self.binding: Any = None

    @classmethod
    def empty(
        cls, n: int, batch: int, n_kv_heads: int, head_dim: int, capacity: int = 64
    ) -> StaticCache:
        """``n`` float32 numpy buffers with nothing in use yet."""
        shape = (batch, n_kv_heads, capacity, head_dim)
        return cls([np.zeros(shape, dtype=np.float32) for _ in range(n)])

    @classmethod
    def from_prefill(cls, prefill: list[Any], capacity: int) -> StaticCache:
        """Buffers of ``capacity`` slots (at least the prefill's length) holding ``prefill``:
        the new tokens' keys and values, one array per cache input."""
        B, H_kv, T, hd = prefill[0].shape
        cache = cls([_zeros(x, (B, H_kv, max(capacity, T), hd)) for x in prefill])
        cache.write(prefill)
        return cache

    @property
    def capacity(self) -> int:
        return int(self.buffers[0].shape[2])

    def reserve(self, needed: int, limit: int | None = None) -> None:
        """Room for ``needed`` slots: the capacity doubles, but not past ``limit``."""
        if needed <= self.capacity:
            return
        capacity = self.capacity
        while capacity < needed:
            capacity *= 2
        if limit is not None:
            capacity = max(needed, min(capacity, limit))
        grown = []
        for buf in self.buffers:
            new = _zeros(buf, (buf.shape[0], buf.shape[1], capacity, buf.shape[3]))
            new[:, :, : self.length] = buf[:, :, : self.length]
            grown.append(new)
        self.buffers, self.binding = grown, None

    def write(self, new: list[Any]) -> None:
        """Put the new tokens' keys and values (one array per buffer) in the next slots (the
        caller reserves room first: a write past the capacity is an error)."""
        L, T = self.length, new[0].shape[2]
        for buf, x in zip(self.buffers, new):
            buf[:, :, L : L + T] = x
        self.length = L + T

    def keep_rows(self, rows: list[int]) -> StaticCache:
        """Only the given rows (finished rows leave the batch)."""
        self.buffers = [_take_rows(buf, rows) for buf in self.buffers]
        self.binding = None
        return self

    def drop_slots(self, k: int) -> StaticCache:
        """Without the first ``k`` slots (padding for every row): the rest moves left."""
        kept = self.length - k
        moved = []
        for buf in self.buffers:
            new = _zeros(buf, tuple(buf.shape))
            new[:, :, :kept] = buf[:, :, k : self.length]
            moved.append(new)
        self.buffers, self.length = moved, kept
        self.binding = None
        return self

    def join(self, other: StaticCache, shift: int, shift_other: int, width: int) -> StaticCache:
        """This cache's rows, then ``other``'s, each moved right by its shift (``width`` slots
        in use after)."""
        used, shifts = (self.length, other.length), (shift, shift_other)
        buffers = [_stack(a, b, used, shifts, width) for a, b in zip(self.buffers, other.buffers)]
        return StaticCache(buffers, width)


def _is_pair(layer: Any) -> bool:
    """A layer's (keys, values), as a torch model returns them, rather than one array."""
    return not hasattr(layer, "shape")


def keep_rows(past: Any, rows: list[int]) -> Any:
    """The cache of the given rows only, for either kind of cache."""
    if isinstance(past, StaticCache):
        return past.keep_rows(rows)
    return [
        tuple(_take_rows(x, rows) for x in layer) if _is_pair(layer) else _take_rows(layer, rows)
        for layer in past
    ]


def drop_slots(past: Any, k: int) -> Any:
    """The cache without its first ``k`` slots, for either kind of cache: when the rows that
    needed them have left, the others no longer pay for attending over their padding."""
    if isinstance(past, StaticCache):
        return past.drop_slots(k)

    def drop(x: Any) -> Any:
        rest = x[:, :, k:]
        return np.ascontiguousarray(rest) if isinstance(rest, np.ndarray) else rest.contiguous()

    return [tuple(drop(x) for x in layer) if _is_pair(layer) else drop(layer) for layer in past]


def join_rows(past: Any, new: Any, shift: int, shift_new: int, width: int) -> Any:
    """The running rows' cache, then the joiners', right-aligned in ``width`` slots (see
    ``DecodeBatch``), for either kind of cache."""
    if isinstance(past, StaticCache):
        return past.join(new, shift, shift_new, width)

    def stack(a: Any, b: Any) -> Any:
        return _stack(a, b, (a.shape[2], b.shape[2]), (shift, shift_new), width)

    return [
        tuple(stack(a, b) for a, b in zip(layer, joined))
        if _is_pair(layer)
        else stack(layer, joined)
        for layer, joined in zip(past, new)
    ]
