"""Helpers shared by the tests."""

import os
import subprocess
import sys


def run_cli(*args, cwd=None, env=None, timeout=600, input=None):
    """Run ``python -m gptkit ARGS`` in a real subprocess."""
    full_env = {**os.environ, **(env or {})}
    return subprocess.run(
        [sys.executable, "-m", "gptkit", *map(str, args)],
        cwd=cwd,
        env=full_env,
        capture_output=True,
        text=True,
        timeout=timeout,
        input=input,
    )


def assert_user_error(result, *needles):
    """Exit code 2, every needle in stderr, and no traceback."""
    assert result.returncode == 2, (result.returncode, result.stdout, result.stderr)
    assert "Traceback" not in result.stderr, result.stderr
    for needle in needles:
        assert needle in result.stderr, (needle, result.stderr)
