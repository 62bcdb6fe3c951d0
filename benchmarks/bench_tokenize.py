"""Old (a3c9e36, whole text in memory) vs new (streamed) data preparation on one corpus, back
to back in one process: seconds, MB/s and the ratio. usage: bench_tokenize.py FILE KIND"""

import importlib.util
import shutil
import sys
import tempfile
import time
from pathlib import Path

from gptkit.data import prepare_data
from gptkit.spec import validate_spec


def main():
    path, kind = sys.argv[1], sys.argv[2]
    spec = validate_spec({"data": {"source": path}, "tokenizer": kind})
    mb = Path(path).stat().st_size / 1e6
    old_spec = importlib.util.spec_from_file_location(
        "old_data", Path(__file__).with_name("old_data_a3c9e36.py")
    )
    old = importlib.util.module_from_spec(old_spec)
    old_spec.loader.exec_module(old)
    times = {}
    for name, fn in (("old", old.prepare_data), ("new", prepare_data)):
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
    print(f"speed-up new/old: {times['old'] / times['new']:.2f}x")


if __name__ == "__main__":
    main()
