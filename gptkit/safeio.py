"""Reading files that may be hostile: regular files only, sizes counted while reading.

Every file gptkit reads on a user's behalf (specs, manifests, tokenizer files, data) goes
through here. A FIFO would block forever, ``/dev/zero`` (or a symlink to it) never ends, and
``st_size`` is whatever the file system says — so the file is opened without blocking, checked
to be a regular file *after* opening (no race between the check and the read), and read with
a byte count that stops one byte past the limit.

Parsed documents are bounded too: :func:`check_tree` refuses structures that nest too deeply
or whose YAML aliases expand past a limit ("billion laughs"), in time proportional to the
document, not to its expansion.
"""

from __future__ import annotations

import math
import os
import re
import stat
from collections.abc import Iterator
from pathlib import Path
from typing import Any, BinaryIO

from gptkit.errors import GptkitError

CHUNK = 1 << 20
MAX_DEPTH = 64  # nesting of mappings/lists in a spec or manifest
MAX_NODES = 100_000  # values in a document once YAML aliases are expanded


def _describe(mode: int) -> str:
    for test, name in (
        (stat.S_ISFIFO, "a FIFO (named pipe)"),
        (stat.S_ISCHR, "a character device"),
        (stat.S_ISBLK, "a block device"),
        (stat.S_ISSOCK, "a socket"),
        (stat.S_ISDIR, "a directory"),
    ):
        if test(mode):
            return name
    return "not a regular file"


def open_regular(path: str | Path, what: str, error: type[GptkitError] = GptkitError) -> int:
    """Open ``path`` for reading and return the descriptor; refuse anything but a regular file.

    ``what`` names the file in messages ("spec file", "data file"). Symlinks are followed, so a
    link to a regular file is fine and a link to ``/dev/zero`` is refused.
    """
    try:
        # Checked before opening too: opening some device files has effects of its own.
        mode = os.stat(path).st_mode
        if not stat.S_ISREG(mode):
            raise error(f"{what} {path} is {_describe(mode)}; expected a regular file")
        # O_NONBLOCK: a FIFO swapped in after the check still opens at once, never hangs.
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0))
    except FileNotFoundError:
        raise error(f"{what} not found: {path}") from None
    except IsADirectoryError:
        raise error(f"{what} {path} is a directory, not a file") from None
    except OSError as exc:
        raise error(f"cannot read {what} {path}: {exc.strerror or exc}") from None
    except (RuntimeError, ValueError) as exc:  # a symlink loop, a NUL byte in the name
        raise error(f"cannot read {what} {path}: {exc}") from None
    mode = os.fstat(fd).st_mode
    if not stat.S_ISREG(mode):
        os.close(fd)
        raise error(f"{what} {path} is {_describe(mode)}; expected a regular file")
    os.set_blocking(fd, True)
    return fd


def open_stream(path: str | Path, what: str, error: type[GptkitError] = GptkitError) -> BinaryIO:
    """A binary file object for a regular file, for reads too large to hold at once (data files,
    hashing): :func:`open_regular`'s checks, then an ordinary buffered reader."""
    return os.fdopen(open_regular(path, what, error), "rb")


def check_regular(
    path: str | Path, what: str, limit: int | None = None, error: type[GptkitError] = GptkitError
) -> None:
    """Refuse ``path`` unless it is a regular file (of at most ``limit`` bytes).

    For files handed by name to a library that reads them itself (onnxruntime, tokenizers):
    for a regular file ``st_size`` is what the library will read.
    """
    fd = open_regular(path, what, error)
    try:
        size = os.fstat(fd).st_size
    finally:
        os.close(fd)
    if limit is not None and size > limit:
        raise error(f"{what} {path} is {size:,} bytes; at most {limit:,} bytes are accepted")


def read_bytes(
    path: str | Path, what: str, limit: int, error: type[GptkitError] = GptkitError
) -> bytes:
    """The bytes of a regular file of at most ``limit`` bytes, counted while reading."""
    fd = open_regular(path, what, error)
    size = os.fstat(fd).st_size
    if size > limit:
        os.close(fd)
        raise error(f"{what} {path} is {size:,} bytes; at most {limit:,} bytes are accepted")
    parts, total = [], 0
    try:
        while True:
            block = os.read(fd, min(CHUNK, limit + 1 - total))
            if not block:
                break
            parts.append(block)
            total += len(block)
            if total > limit:
                raise error(f"{what} {path} is larger than {limit:,} bytes; refusing to read it")
    except OSError as exc:
        raise error(f"cannot read {what} {path}: {exc.strerror}") from None
    finally:
        os.close(fd)
    return b"".join(parts)


def read_text(
    path: str | Path, what: str, limit: int, error: type[GptkitError] = GptkitError
) -> str:
    """:func:`read_bytes` decoded as UTF-8, with a clear message when it is not."""
    raw = read_bytes(path, what, limit, error)
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise error(f"{what} {path} is not UTF-8 text (bad byte at offset {exc.start})") from None


def read_json(
    path: str | Path, what: str, limit: int, error: type[GptkitError] = GptkitError
) -> Any:
    """A bounded JSON document: size, nesting depth and value count are all limited."""
    import json

    text = read_text(path, what, limit, error)
    try:
        doc = json.loads(text)
    except ValueError as exc:
        if is_digit_limit(exc):
            raise error(f"{what} {path} holds an integer of thousands of digits") from None
        raise error(f"{what} {path} is not valid JSON: {exc}") from None
    except RecursionError:
        raise error(f"{what} {path} nests too deeply (at most {MAX_DEPTH} levels)") from None
    check_tree(doc, f"{what} {path}", error)
    return doc


_CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f]")


def escape_controls(text: str) -> str:
    """``text`` safe for a terminal: control characters (an escape sequence that retitles the
    window or recolours what follows, in a run's name someone else wrote) as ``\\x1b``."""
    return _CONTROL.sub(lambda m: f"\\x{ord(m.group()):02x}", text)


def is_digit_limit(exc: BaseException) -> bool:
    """Whether ``exc`` is Python's refusal of an integer of thousands of digits (JSON that
    holds one: ``sys.set_int_max_str_digits``)."""
    text = str(exc)
    return isinstance(exc, ValueError) and (
        "int_max_str_digits" in text or "integer string conversion" in text
    )


def as_new_file(path: Path) -> None:
    """Give ``path`` the permissions a file created here gets (the umask's): safetensors
    writes its files 0600, so a checkpoint's or an export's weights were unreadable to the
    user's group where its other files are not. The umask is read from a file just made (not
    with ``os.umask``, which would change it for a moment under other threads)."""
    probe = path.with_name(f".{path.name}.{os.getpid()}.mode")
    probe.touch()
    try:
        os.chmod(path, probe.stat().st_mode & 0o666)
    finally:
        probe.unlink(missing_ok=True)


def finite_number(value: Any) -> float | None:
    """``value`` as a float if it is a finite number (not a bool, not an integer too large for
    a float, which ``math.isfinite`` raises on); else None. For numbers read from files."""
    if not isinstance(value, (int, float)) or isinstance(value, bool):
        return None
    try:
        number = float(value)
    except OverflowError:
        return None
    return number if math.isfinite(number) else None


def check_tree(
    doc: Any,
    source: str,
    error: type[GptkitError] = GptkitError,
    max_depth: int = MAX_DEPTH,
    max_nodes: int = MAX_NODES,
) -> None:
    """Refuse a parsed document that nests too deeply, refers to itself, or is too large once
    shared parts (YAML aliases) are counted as often as they are used.

    Sizes are memoised per object, so a "billion laughs" document is measured in a few hundred
    steps and refused, never expanded.
    """
    sizes: dict[int, int] = {}
    active: set[int] = set()

    def size(node: Any, depth: int) -> int:
        if not isinstance(node, (dict, list)):
            return 1
        key = id(node)
        if key in sizes:
            return sizes[key]
        if key in active:
            raise error(f"{source}: the document refers to itself (recursive YAML anchor)")
        if depth > max_depth:
            raise error(f"{source} nests too deeply (at most {max_depth} levels)")
        active.add(key)
        children = node.values() if isinstance(node, dict) else node
        total = 1
        for child in children:
            total += size(child, depth + 1)
            if total > max_nodes:
                raise error(
                    f"{source} expands to more than {max_nodes:,} values (YAML aliases "
                    "that repeat each other?); refusing to expand it"
                )
        active.discard(key)
        sizes[key] = total
        return total

    size(doc, 1)


MAX_WALK_FILES = 100_000  # files one folder walk may return
MAX_WALK_ENTRIES = 1_000_000  # entries one folder walk may look at


def entries(root: str | Path, error: type[GptkitError] = GptkitError) -> Iterator[tuple[str, int]]:
    """Every entry under ``root`` as (its path relative to ``root``, its ``lstat`` mode):
    links are reported, never followed; at most :data:`MAX_WALK_ENTRIES`, else ``error``."""
    root = Path(root)
    looked = 0
    for folder, dirs, files in os.walk(root, followlinks=False):
        for name in [*dirs, *files]:
            looked += 1
            if looked > MAX_WALK_ENTRIES:
                raise error(f"{root} holds more than {MAX_WALK_ENTRIES:,} entries")
            path = Path(folder) / name
            yield path.relative_to(root).as_posix(), os.lstat(path).st_mode


def walk_files(
    root: str | Path,
    max_depth: int | None = None,
    limit: int = MAX_WALK_FILES,
    error: type[GptkitError] = GptkitError,
) -> list[Path]:
    """Regular files under ``root`` (sorted, hidden names skipped), bounded and cycle-safe.

    Symlinked folders are followed, but every folder is entered once (by device and inode), so
    a link to ``.`` or a parent ends the branch instead of repeating it forever. At most
    ``limit`` files and :data:`MAX_WALK_ENTRIES` entries; ``max_depth`` folders deep (None:
    no depth limit besides the cycle check).
    """
    seen: set[tuple[int, int]] = set()
    found: list[Path] = []
    looked = 0
    stack: list[tuple[Path, int]] = [(Path(root), 0)]
    while stack:
        folder, depth = stack.pop()
        try:
            info = os.stat(folder)
            if (info.st_dev, info.st_ino) in seen:
                continue
            seen.add((info.st_dev, info.st_ino))
            entries = sorted(os.scandir(folder), key=lambda e: e.name)
        except OSError:
            continue  # vanished, unreadable or a symlink loop: nothing to take from it
        for entry in entries:
            looked += 1
            if looked > MAX_WALK_ENTRIES:
                raise error(f"{root} holds more than {MAX_WALK_ENTRIES:,} entries; name fewer")
            if entry.name.startswith("."):
                continue
            try:
                is_dir = entry.is_dir()
                is_file = not is_dir and entry.is_file()
            except OSError:
                continue
            if is_dir and (max_depth is None or depth < max_depth):
                stack.append((Path(entry.path), depth + 1))
            elif is_file:
                found.append(Path(entry.path))
                if len(found) > limit:
                    raise error(f"{root} holds more than {limit:,} files; name fewer")
    return sorted(found)
