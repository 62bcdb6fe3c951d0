"""A --run-dir that cannot be made (issue 26): exit 2 with the folder named, no traceback."""

import pytest

from tests.conftest import ROOT
from tests.helpers import assert_user_error, run_cli


@pytest.mark.slow  # builds the model before taking the run folder: ~4 s
def test_a_run_dir_that_cannot_be_made_exits_2(tmp_path):
    result = run_cli(
        "train",
        ROOT / "experiments" / "smoke.yaml",
        "--run-dir",
        "/proc/x",
        "--no-progress",
        "--set",
        "tracking.enabled=false",
        cwd=tmp_path,
        timeout=120,
    )
    assert_user_error(result, "cannot make the run folder /proc/x")
