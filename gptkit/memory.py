"""What fits in this machine's memory: checked before a large allocation, so that a size asked
for by mistake (a spec edited to a billion-token vocabulary, a million samples at once) is a
clear error rather than an allocator's traceback or the kernel's OOM killer. Torch-free."""

from __future__ import annotations

import os

from gptkit.errors import GptkitError


def physical_memory() -> int | None:
    """This machine's memory in bytes, or None where the system does not say."""
    try:
        memory = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (AttributeError, ValueError, OSError):  # not a POSIX system
        return None
    return memory if memory > 0 else None


def check_fits(needed: int, what: str, hint: str) -> None:
    """Refuse ``needed`` bytes for ``what`` when they are more than this machine's memory."""
    memory = physical_memory()
    if memory is not None and needed > memory:
        raise GptkitError(
            f"{what} need about {needed / 2**30:,.1f} GiB, more than this machine's "
            f"{memory / 2**30:,.1f} GiB of memory",
            hint,
        )
