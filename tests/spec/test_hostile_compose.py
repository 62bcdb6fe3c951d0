"""Hostile `extends:` compositions (issue 26): a parent repeated many times is read once,
compositions are bounded (32 deep, 256 files, 256 entries per list), a symlink loop as the
spec path is a message. Each ends fast with exit 0 or a clear exit 2, never a traceback."""

import os
import time

import pytest

from tests.conftest import ROOT
from tests.helpers import assert_user_error, run_cli

SMOKE = ROOT / "experiments" / "smoke.yaml"


@pytest.mark.slow  # validates a spec in a subprocess: ~2.5 s on 2 shared cores
def test_a_parent_named_many_times_is_composed_once(tmp_path):
    # 13 files each extending the next four times: 4**13 reads without a memo.
    (tmp_path / "f13.yaml").write_text(f"extends: {SMOKE}\nname: deep\n")
    for i in range(12, -1, -1):
        names = ", ".join([f"f{i + 1}.yaml"] * 4)
        (tmp_path / f"f{i}.yaml").write_text(f"extends: [{names}]\n")
    started = time.perf_counter()
    result = run_cli("validate", tmp_path / "f0.yaml", "--print-spec", cwd=tmp_path, timeout=60)
    assert result.returncode == 0, result.stderr
    assert time.perf_counter() - started < 10
    assert result.stdout.count("f13.yaml") >= 1


@pytest.mark.slow  # CLI subprocesses: 2-5 s on 2 cores
def test_oversized_compositions_are_refused_clearly(tmp_path):
    (tmp_path / "p.yaml").write_text("name: p\n")
    (tmp_path / "wide.yaml").write_text("extends: [" + ", ".join(["p.yaml"] * 30_000) + "]\n")
    assert_user_error(
        run_cli("validate", tmp_path / "wide.yaml", timeout=60),
        "extends lists 30,000 files; at most 256",
    )
    for i in range(40):  # a chain 40 files deep
        (tmp_path / f"c{i}.yaml").write_text(f"extends: c{i + 1}.yaml\n" if i < 39 else "name: c\n")
    assert_user_error(
        run_cli("validate", tmp_path / "c0.yaml", timeout=60), "more than 32 files deep"
    )
    os.symlink("loop-b.yaml", tmp_path / "loop-a.yaml")
    os.symlink("loop-a.yaml", tmp_path / "loop-b.yaml")
    assert_user_error(
        run_cli("validate", tmp_path / "loop-a.yaml", timeout=60), "loop-a.yaml", "symbolic links"
    )


@pytest.mark.parametrize("parent", ["/dev/zero", "."])
def test_extends_naming_a_device_or_a_folder_says_what_it_is(tmp_path, parent):
    """It said "no such file" of /dev/zero or a folder, which exist."""
    from gptkit.errors import GptkitError
    from gptkit.spec.files import compose_spec_file

    spec = tmp_path / "s.yaml"
    spec.write_text(f"extends: {parent}\n")
    with pytest.raises(GptkitError, match=f"extends '{parent}': not a regular file"):
        compose_spec_file(spec)
