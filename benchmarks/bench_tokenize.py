"""Data preparation now against an earlier commit's (default a3c9e36: whole text in memory),
back to back in one process: seconds, MB/s and the ratio.

usage: bench_tokenize.py FILE KIND [REV]

The baseline is read from git history (``git show REV:gptkit/data.py``), not kept as a copy
in the tree; it runs against the current package's tokenizers.
"""

import importlib.util
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from gptkit.data.prepare import prepare_tokens
from gptkit.spec.validate import validate_spec

ROOT = Path(__file__).resolve().parents[1]


def baseline(rev: str):
    """The ``prepare_data`` of ``gptkit/data.py`` at ``rev``, loaded from git history."""
    source = subprocess.run(
        ["git", "show", f"{rev}:gptkit/data.py"], cwd=ROOT, capture_output=True, text=True
    )
    if source.returncode != 0:
        sys.exit(f"cannot read gptkit/data.py at {rev}: {source.stderr.strip()}")
    path = Path(tempfile.mkdtemp(prefix="bench-baseline-")) / f"data_{rev}.py"
    path.write_text(source.stdout)
    spec = importlib.util.spec_from_file_location(f"data_{rev}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.prepare_data


def main():
    path, kind = sys.argv[1], sys.argv[2]
    rev = sys.argv[3] if len(sys.argv) > 3 else "a3c9e36"
    spec = validate_spec({"data": {"source": path}, "tokenizer": kind})
    mb = Path(path).stat().st_size / 1e6
    times = {}
    for name, fn in ((rev, baseline(rev)), ("now", prepare_tokens)):
        cache = Path(tempfile.mkdtemp(prefix=f"bench-{name}-"))
        t = time.perf_counter()
        data = fn(spec.data, spec.tokenizer, cache=cache)
        times[name] = time.perf_counter() - t
        print(
            f"{name}: {mb:.1f} MB {kind} -> {len(data.train) + len(data.val):,} tokens in "
            f"{times[name]:.1f}s = {mb / times[name]:.1f} MB/s",
            flush=True,
        )
        del data
        shutil.rmtree(cache)
    print(f"speed-up now/{rev}: {times[rev] / times['now']:.2f}x")


if __name__ == "__main__":
    main()
