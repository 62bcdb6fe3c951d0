"""Text sources, streamed into sharded token files, and the train/validation split.

The corpus never sits in memory whole. ``prepare_tokens`` runs one pipeline:

    sources -> pieces (~1 MB of a text file, a block of JSON Lines, a batch of records)
            -> token ids (worker processes for char/byte, the tokenizer library's batch
               encoder for BPE) -> shard files of up to ``data.shard_tokens`` ids
            -> memory-mapped for training

Conventions, all documented in the README's data section:

* **Documents.** A text file is one document; so is each JSON Lines / Parquet / dataset
  record. Documents are separated by the tokenizer's end-of-text id (``eot_id``): for ``char``
  and ``byte`` that is the id after the last character/byte (``len(chars)`` and 256), for
  BPE/SentencePiece the ``<|endoftext|>`` token. A single-file corpus therefore holds no
  end-of-text id at all, exactly as before.
* **Validation.** The last ``data.val_fraction`` of the token stream (nanoGPT's split, made on
  token ids so that it needs neither the corpus in memory nor a pass before tokenizing). It may
  cut a document in two.
* **Fitting.** Tokenizers that learn a vocabulary see a sample of the first
  ``1 - val_fraction`` of the sources' bytes: all of it when that is at most
  ``data.fit_sample_bytes``, else pieces drawn with a seeded RNG (``data.fit_seed``) up to that
  size. Characters the char tokenizer never saw are dropped (and counted).
* **Cache.** ``<cache>/tokens/<key>/`` with ``shard-NNNNN.bin`` files (llm.c/nanoGPT layout: a
  256 x int32 header - magic 20240520, version 1 for uint16 or 2 for uint32 ids, token count -
  then the ids) and ``meta.json``. The key hashes the sources' bytes and the tokenizer/data
  settings. The folder is built under a temporary name and renamed into place only when
  complete, so an interrupted or failed preparation (bad input, disk full) leaves nothing that
  looks like a valid cache.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import sys
import time
from collections import deque
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from gptkit.data.encode import POOL_MIN_BYTES, _init_worker, _work, _workers_for, fit_tokenizer
from gptkit.data.shards import CACHE_FORMAT, ShardWriter, TokenArray, open_shard, token_dtype
from gptkit.data.sources import EMBEDDED, Source, iter_pieces, piece_has_text, resolve_sources
from gptkit.errors import DataError
from gptkit.safeio import open_stream, read_json

MAX_META = 64 << 20  # a cache entry's meta.json


def cache_dir() -> Path:
    """Where tokenized corpora are cached: $GPTKIT_CACHE_DIR, else ~/.cache/gptkit."""
    root = os.environ.get("GPTKIT_CACHE_DIR") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "gptkit"
    )
    if os.path.exists(root) and not os.path.isdir(root):
        raise DataError(
            f"the token cache folder {root} is not a folder",
            "Point GPTKIT_CACHE_DIR at a folder (it is made if missing).",
        )
    return Path(root)


class TokenData:
    """Train and validation token ids (memory-mapped shards) and the fitted tokenizer."""

    def __init__(
        self,
        train,
        val,
        tokenizer,
        cached: bool,
        folder: Path | None = None,
        meta: dict[str, Any] | None = None,
    ) -> None:
        self.train = train  # TokenArray (1-D, memory-mapped)
        self.val = val
        self.tokenizer = tokenizer
        self.cached = cached  # True when read back from the cache, not tokenized now
        self.folder = folder  # the cache entry
        self.meta = meta or {}  # the cache entry's meta.json: source bytes, shards, documents

    def layout(self, seconds: float) -> dict[str, Any]:
        """What ``gptkit prepare`` reports: the cache entry, its tokens and its shards."""
        meta = self.meta
        return {
            "cache": str(self.folder),
            "reused": self.cached,
            "tokenizer": self.tokenizer.spec.kind,
            "vocab_size": self.tokenizer.vocab_size,
            "eot_id": self.tokenizer.eot_id,
            "dtype": meta["dtype"],
            "tokens": meta["tokens"],
            "train_tokens": len(self.train),
            "val_tokens": len(self.val),
            "documents": meta["documents"],
            "source_bytes": meta["source_bytes"],
            "content_sha256": meta.get("content_sha256"),  # what a run's MLflow dataset shows
            "seconds": round(seconds, 3),
            "shards": meta["shards"],
        }


class PrepareProgress:
    """MB done, MB/s and ETA: a live bar on a terminal, a plain line every few seconds else."""

    def __init__(self, total_bytes: int, enabled: bool, label: str = "tokenize") -> None:
        self.total, self.enabled, self.label = max(1, total_bytes), enabled, label
        self.done = 0
        self.started = self._last = time.perf_counter()
        self._bar = None
        if enabled and sys.stderr.isatty():
            from rich.progress import (
                BarColumn,
                DownloadColumn,
                Progress,
                TextColumn,
                TimeRemainingColumn,
                TransferSpeedColumn,
            )

            self._bar = Progress(
                TextColumn(label),
                BarColumn(),
                DownloadColumn(),
                TransferSpeedColumn(),
                TimeRemainingColumn(),
                transient=False,
            )
            self._task = self._bar.add_task(label, total=self.total)
            self._bar.start()

    def advance(self, nbytes: int) -> None:
        self.done += nbytes
        if not self.enabled:
            return
        if self._bar is not None:
            self._bar.update(self._task, completed=min(self.done, self.total))
            return
        now = time.perf_counter()
        if now - self._last >= 5.0:
            self._last = now
            print(self.line(), file=sys.stderr, flush=True)

    def line(self) -> str:
        elapsed = max(time.perf_counter() - self.started, 1e-9)
        rate = self.done / elapsed
        eta = (self.total - self.done) / rate if rate > 0 else 0
        return (
            f"{self.label}: {self.done / 1e6:,.1f}/{self.total / 1e6:,.1f} MB "
            f"({100 * min(1.0, self.done / self.total):.0f}%) | {rate / 1e6:.1f} MB/s | "
            f"eta {int(eta) // 60}m{int(eta) % 60:02d}s"
        )

    def close(self) -> None:
        if self._bar is not None:
            self._bar.stop()
            self._bar = None


def _content_digest(sources: list[Source]) -> str:
    """sha256 over every source's bytes (streamed in 8 MB blocks)."""
    h = hashlib.sha256()
    for src in sources:
        h.update(f"{src.kind}\0".encode())
        if src.kind == "embedded":
            h.update(EMBEDDED[src.name][1].encode())
            continue
        files = (
            sorted(p for p in src.path.rglob("*") if p.is_file())
            if src.path.is_dir()
            else [src.path]
        )
        for path in files:
            h.update(f"{path.relative_to(src.path) if src.path.is_dir() else ''}\0".encode())
            try:
                with open_stream(path, "data file", DataError) as f:
                    while block := f.read(8 << 20):
                        h.update(block)
            except OSError as exc:  # e.g. /proc/self/mem: a "regular" file that cannot be read
                raise DataError(
                    f"cannot read data file {path}: {exc.strerror or exc}",
                    "Name files that hold your text in data.source.",
                ) from None
    return h.hexdigest()


def cache_key(data_spec, tokenizer_spec, digest: str) -> str:
    """The cache entry's name: the content hash, then a hash of everything that shapes ids."""
    blob = json.dumps(
        {
            "format": CACHE_FORMAT,
            "tok": tokenizer_spec.model_dump(mode="json", exclude={"chat_template"}),
            "fingerprint": tokenizer_spec.fingerprint(),
            "data": data_spec.model_dump(mode="json", exclude={"source"}),
        },
        sort_keys=True,
    )
    return f"{digest[:16]}-{hashlib.sha256(blob.encode()).hexdigest()[:12]}"


def _tokenize_into(
    sources: list[Source],
    data_spec,
    tokenizer,
    writer: ShardWriter,
    progress: PrepareProgress,
    workers: int,
) -> dict[str, int]:
    """Run every piece through the tokenizer into ``writer``, in order, ``workers`` at once."""
    dtype = writer.dtype.name
    stats = {"documents": 0, "dropped": 0}
    pieces = iter_pieces(sources, data_spec.field, data_spec.split)

    def take(result, nbytes):
        ids, dropped, docs = result
        writer.write(ids)
        stats["dropped"] += dropped
        stats["documents"] += docs
        progress.advance(nbytes)

    first = True
    if workers <= 1:
        _init_worker(tokenizer)
        for piece in pieces:
            take(_work(piece, first, dtype), piece.nbytes)
            first = first and not piece_has_text(piece)
        return stats
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor

    # fork where there is one: workers start at once and need no importable __main__ (a
    # notebook, a script without a main guard). They only run NumPy and the tokenizer.
    methods = multiprocessing.get_all_start_methods()
    ctx = multiprocessing.get_context("fork" if "fork" in methods else "spawn")
    with ProcessPoolExecutor(
        workers, mp_context=ctx, initializer=_init_worker, initargs=(tokenizer,)
    ) as pool:
        window: deque = deque()
        try:
            for piece in pieces:
                # Bounded: at most 2 pieces per worker are in flight, whatever the corpus size.
                window.append((pool.submit(_work, piece, first, dtype), piece.nbytes))
                first = first and not piece_has_text(piece)
                while len(window) >= 2 * workers:
                    fut, nbytes = window.popleft()
                    take(fut.result(), nbytes)
            while window:
                fut, nbytes = window.popleft()
                take(fut.result(), nbytes)
        except BaseException:
            for fut, _ in window:
                fut.cancel()
            raise
    return stats


def _load_entry(folder: Path, spec_class=None):
    """(meta, tokenizer, shards) of a complete cache entry; raises if anything is off.
    ``spec_class``: the tokenizer spec's class (a spec's own ``plugins:`` may provide it)."""
    from gptkit.components.tokenizers import load_tokenizer

    # A FIFO or device in meta.json's place is refused, not read: the entry is rebuilt.
    meta = read_json(folder / "meta.json", "token cache meta", MAX_META, DataError)
    if not isinstance(meta, dict) or meta.get("format") != CACHE_FORMAT:
        raise ValueError("old cache format")
    tokenizer = load_tokenizer(folder / "tokenizer", spec_class=spec_class)
    _check_meta(meta, tokenizer.vocab_size)
    shards = [open_shard(folder / s["file"], s["tokens"]) for s in meta["shards"]]
    _check_ids(shards, tokenizer.vocab_size)
    return meta, tokenizer, shards


def _check_ids(shards: list, vocab_size: int, chunk: int = 1 << 24) -> None:
    """Refuse (ValueError: the entry is rebuilt) shards holding an id past the vocabulary, which
    training would otherwise meet as an IndexError in the embedding. One pass over the ids,
    in chunks, so memory stays bounded however large the corpus."""
    for shard in shards:
        for start in range(0, len(shard), chunk):
            if int(np.max(shard[start : start + chunk])) >= vocab_size:
                raise ValueError("a token id past the vocabulary")


def _check_meta(meta: dict, vocab_size: int) -> None:
    """Refuse (ValueError: the entry is rebuilt) a meta.json whose counts do not add up."""

    def count(value) -> bool:
        return isinstance(value, int) and not isinstance(value, bool) and value >= 0

    shards = meta.get("shards")
    if not isinstance(shards, list) or not all(
        isinstance(s, dict) and isinstance(s.get("file"), str) and count(s.get("tokens"))
        for s in shards
    ):
        raise ValueError("meta.json: bad shard list")
    if not count(meta.get("tokens")) or meta["tokens"] != sum(s["tokens"] for s in shards):
        raise ValueError("meta.json: token count does not match the shards")
    if meta.get("vocab_size") != vocab_size:
        raise ValueError("meta.json: vocabulary size does not match the tokenizer")
    if any(Path(s["file"]).name != s["file"] for s in shards):
        raise ValueError("meta.json: a shard outside the entry")


def _remove_stale_builds(folder: Path) -> None:
    """Delete temporary folders left by builds of this entry whose process is gone (killed)."""
    for tmp in folder.parent.glob(f".tmp-{folder.name}-*"):
        try:
            os.kill(int(tmp.name.split("-")[-2]), 0)  # still running: leave it be
        except (ValueError, IndexError, ProcessLookupError):
            shutil.rmtree(tmp, ignore_errors=True)
        except PermissionError:
            pass


def _build_entry(
    folder: Path,
    sources,
    data_spec,
    tokenizer_spec,
    digest: str,
    progress: bool | None,
    workers: int | None,
    log,
) -> None:
    """Fit, tokenize and write a cache entry under a temporary name; rename it into place."""
    total = sum(s.size for s in sources)
    show = progress if progress is not None else total >= POOL_MIN_BYTES
    tmp = folder.with_name(f".tmp-{folder.name}-{os.getpid()}-{time.time_ns()}")
    tmp.mkdir(parents=True)
    writer = None
    try:
        started = time.perf_counter()
        tokenizer = fit_tokenizer(data_spec, tokenizer_spec, sources)
        tokenizer.save(tmp / "tokenizer")
        dtype = token_dtype(tokenizer.vocab_size)
        writer = ShardWriter(tmp, dtype, data_spec.shard_tokens)
        n_workers = _workers_for(tokenizer, total, workers)
        bar = PrepareProgress(total, show)
        try:
            stats = _tokenize_into(sources, data_spec, tokenizer, writer, bar, n_workers)
        finally:
            bar.close()
        shards = writer.finish()
        elapsed = time.perf_counter() - started
        meta = {
            "format": CACHE_FORMAT,
            "dtype": np.dtype(dtype).name,
            "tokens": writer.total,
            "shards": shards,
            "eot_id": tokenizer.eot_id,
            "vocab_size": tokenizer.vocab_size,
            "val_fraction": data_spec.val_fraction,
            "documents": stats["documents"],
            "dropped_characters": stats["dropped"],
            "source_bytes": total,
            "content_sha256": digest,
            "sources": [s.name for s in sources],
            "workers": n_workers,
            "seconds": round(elapsed, 3),
        }
        (tmp / "meta.json").write_text(json.dumps(meta, indent=1))
        if show:
            log(
                f"tokenized {total / 1e6:,.1f} MB into {writer.total:,} tokens in {elapsed:.1f}s "
                f"({total / 1e6 / max(elapsed, 1e-9):.1f} MB/s, {n_workers} process"
                f"{'es' if n_workers > 1 else ''})"
            )
        if folder.exists():  # a damaged entry, or another process finished first
            try:
                _load_entry(folder, type(tokenizer_spec))
                return  # theirs is complete: keep it, drop ours
            except Exception:
                shutil.rmtree(folder, ignore_errors=True)
        os.rename(tmp, folder)
    except OSError as exc:
        raise DataError(
            f"could not write the token cache in {folder.parent}: {exc.strerror or exc}; "
            "nothing was kept",
            "Free space, or point GPTKIT_CACHE_DIR at a disk with room.",
        ) from None
    finally:
        if writer is not None:
            writer.abort()
        shutil.rmtree(tmp, ignore_errors=True)


def prepare_tokens(
    data_spec,
    tokenizer_spec,
    min_len: int = 0,
    cache: Path | None = None,
    progress: bool | None = None,
    workers: int | None = None,
    log: Callable[[str], None] | None = None,
) -> TokenData:
    """Tokenize ``data_spec``'s sources into sharded token files (or reuse them) and split.

    The cache key is the sources' content hash plus the tokenizer and data settings; the
    fitted tokenizer is cached with the ids, so a second run neither refits nor re-tokenizes.
    ``min_len``: each part must hold more tokens than this (one training window plus its
    target). ``progress``: show a bar (None: only for corpora of 32 MB and more).
    ``workers``: tokenizing processes (None: every core for char/byte on large corpora).
    """
    log = log or (lambda text: print(text, file=sys.stderr, flush=True))
    sources = resolve_sources(data_spec.source, data_spec.format)
    digest = _content_digest(sources)
    key = cache_key(data_spec, tokenizer_spec, digest)
    folder = (cache or cache_dir()) / "tokens" / key
    cached = True
    try:
        meta, tokenizer, shards = _load_entry(folder, type(tokenizer_spec))
    except Exception:  # missing or damaged: (re)build it
        cached = False
        folder.parent.mkdir(parents=True, exist_ok=True)
        _remove_stale_builds(folder)
        _build_entry(folder, sources, data_spec, tokenizer_spec, digest, progress, workers, log)
        meta, tokenizer, shards = _load_entry(folder, type(tokenizer_spec))
    # The entry is keyed on every spec field that shapes ids; the others (the chat template)
    # are this spec's, not those of the run that built the entry.
    tokenizer.spec = tokenizer_spec
    total = int(meta["tokens"])
    if total == 0:
        raise DataError(
            f"data.source {data_spec.source!r} is empty (no text in "
            f"{', '.join(meta['sources'][:3])})"
        )
    if meta.get("dropped_characters"):
        log(
            f"gptkit: note: {meta['dropped_characters']:,} characters outside the tokenizer's "
            "vocabulary (fitted on a sample) were dropped"
        )
    cut = int(total * (1 - data_spec.val_fraction))
    train, val = TokenArray(shards, 0, cut), TokenArray(shards, cut, total)
    for name, arr in (("training", train), ("validation", val)):
        if len(arr) <= min_len:
            raise DataError(
                f"the {name} part of data.source has {len(arr)} tokens; it needs more than "
                f"{min_len} (one window of model.max_seq_len plus its target)",
                "Use more text, a smaller model.max_seq_len, or another data.val_fraction.",
            )
    return TokenData(train, val, tokenizer, cached, folder, meta)
