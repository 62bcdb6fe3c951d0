"""The token cache's file format: shards of little-endian ids behind a small header, written
incrementally and read back as memory maps."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np

from gptkit.errors import DataError
from gptkit.safeio import check_regular

HEADER_INTS = 256  # llm.c's .bin header: 256 int32


MAGIC = 20240520


CACHE_FORMAT = 2


def token_dtype(vocab_size: int):
    """uint16 while every id fits (as nanoGPT's .bin files), else uint32."""
    return np.uint16 if vocab_size <= 1 << 16 else np.uint32


def write_shard_header(f, dtype, n_tokens: int) -> None:
    """llm.c's header: magic, version (1: uint16 ids, 2: uint32), the count as int32 in [2]
    (as llm.c reads it) and as int64 in [4:6] (shards past 2**31 ids)."""
    header = np.zeros(HEADER_INTS, dtype=np.int32)
    header[:3] = (
        MAGIC,
        1 if np.dtype(dtype) == np.uint16 else 2,
        min(n_tokens, np.iinfo(np.int32).max),
    )
    header.view(np.int64)[2] = n_tokens
    f.seek(0)
    f.write(header.tobytes())


def open_shard(path: Path, expected: int | None = None) -> np.memmap:
    """Memory-map a shard after checking its header (and its length against ``expected``)."""
    check_regular(path, "token shard", error=DataError)  # a FIFO would block np.fromfile
    header = np.fromfile(path, dtype=np.int32, count=HEADER_INTS)
    if len(header) < HEADER_INTS or header[0] != MAGIC or header[1] not in (1, 2):
        raise ValueError(f"{path} is not a gptkit/llm.c token shard")
    dtype = np.uint16 if header[1] == 1 else np.uint32
    n = int(header.view(np.int64)[2])
    if expected is not None and n != expected:
        raise ValueError(f"{path}: header says {n} tokens, meta.json {expected}")
    if path.stat().st_size != HEADER_INTS * 4 + n * np.dtype(dtype).itemsize:
        raise ValueError(f"{path} is truncated")
    if n == 0:
        return np.zeros(0, dtype=dtype)
    return np.memmap(path, dtype=dtype, mode="r", offset=HEADER_INTS * 4, shape=(n,))


class ShardWriter:
    """Append ids to ``shard-NNNNN.bin`` files of at most ``shard_tokens`` ids each."""

    def __init__(self, folder: Path, dtype, shard_tokens: int) -> None:
        self.folder, self.dtype, self.limit = folder, np.dtype(dtype), shard_tokens
        self.shards: list[dict[str, Any]] = []
        self._f = None
        self._n = 0
        self.total = 0

    def _open(self) -> None:
        name = f"shard-{len(self.shards):05d}.bin"
        self._f = open(self.folder / name, "wb")  # noqa: SIM115 - closed in _close
        write_shard_header(self._f, self.dtype, 0)
        self.shards.append({"file": name, "tokens": 0})
        self._n = 0

    def _close(self) -> None:
        if self._f is not None:
            write_shard_header(self._f, self.dtype, self._n)
            self._f.flush()
            os.fsync(self._f.fileno())
            self._f.close()
            self.shards[-1]["tokens"] = self._n
            self._f = None

    def write(self, ids: bytes) -> None:
        arr = np.frombuffer(ids, dtype=self.dtype)
        while len(arr):
            if self._f is None or self._n >= self.limit:
                self._close()
                self._open()
            take = arr[: self.limit - self._n]
            self._f.write(take.tobytes())
            self._n += len(take)
            self.total += len(take)
            arr = arr[len(take) :]

    def finish(self) -> list[dict[str, Any]]:
        if self._f is None and not self.shards:
            self._open()
        self._close()
        return self.shards

    def abort(self) -> None:
        if self._f is not None:
            self._f.close()
            self._f = None


class TokenArray:
    """Ids ``[start, stop)`` of a token stream kept in several memory-mapped shards, read as
    one 1-D array: ``len()``, ints, slices and NumPy fancy indexing
    (``data[starts[:, None] + np.arange(block + 1)]``) all work and read only what they touch."""

    def __init__(self, shards: list[np.ndarray], start: int = 0, stop: int | None = None) -> None:
        self.shards = shards
        self.offsets = np.cumsum([0] + [len(s) for s in shards]).astype(np.int64)
        total = int(self.offsets[-1])
        self.start, self.stop = start, total if stop is None else stop
        if not 0 <= self.start <= self.stop <= total:
            raise ValueError(f"bad token range [{start}, {stop}) of {total}")
        self.dtype = shards[0].dtype if shards else np.dtype(np.uint16)

    def __len__(self) -> int:
        return self.stop - self.start

    @property
    def shape(self) -> tuple[int]:
        return (len(self),)

    @property
    def ndim(self) -> int:
        return 1

    def _gather(self, absolute: np.ndarray) -> np.ndarray:
        if len(self.shards) == 1:
            return np.asarray(self.shards[0][absolute])
        which = np.searchsorted(self.offsets, absolute, side="right") - 1
        out = np.empty(absolute.shape, dtype=self.dtype)
        for s in np.unique(which):
            mask = which == s
            out[mask] = self.shards[s][absolute[mask] - self.offsets[s]]
        return out

    def __getitem__(self, index):
        n = len(self)
        if isinstance(index, (int, np.integer)):
            i = int(index) + (n if index < 0 else 0)
            if not 0 <= i < n:
                raise IndexError(f"token index {index} out of range for {n} tokens")
            return self._gather(np.array([self.start + i]))[0]
        if isinstance(index, slice):
            lo, hi, step = index.indices(n)
            lo, hi = self.start + lo, self.start + max(lo, hi)
            if step != 1:
                return self[np.arange(lo - self.start, hi - self.start, step)]
            parts = []
            for s, shard in enumerate(self.shards):
                a, b = max(lo, self.offsets[s]), min(hi, self.offsets[s + 1])
                if a < b:
                    parts.append(shard[a - self.offsets[s] : b - self.offsets[s]])
            if len(parts) == 1:
                return parts[0]
            return np.concatenate(parts) if parts else np.zeros(0, dtype=self.dtype)
        idx = np.asarray(index)
        if idx.dtype == bool:
            raise IndexError("boolean masks are not supported on a TokenArray")
        idx = idx.astype(np.int64)
        if idx.size and (idx.min() < 0 or idx.max() >= n):
            raise IndexError(f"token index out of range for {n} tokens")
        return self._gather(idx + self.start)

    def __array__(self, dtype=None, copy=None):
        arr = np.asarray(self[:])
        return arr.astype(dtype) if dtype is not None else arr

    def __repr__(self) -> str:
        return f"TokenArray({len(self):,} tokens in {len(self.shards)} shard(s))"
