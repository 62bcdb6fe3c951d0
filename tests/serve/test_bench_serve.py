"""``gptkit bench --serve``: the runtime alone and a real ``gptkit serve`` subprocess with
clients in their own processes, measured in one run."""

import json

import pytest

from tests.helpers import assert_user_error, run_cli

pytestmark = pytest.mark.slow  # a real server and spawned client processes


def test_bench_serve_reports_runtime_and_server_side_by_side(smoke_bundle):
    r = run_cli(
        "bench", "--serve", smoke_bundle, "--gen-tokens", "16", "--clients", "3",
        "--rounds", "1", "--json",
    )  # fmt: skip
    assert r.returncode == 0, r.stderr
    report = json.loads(r.stdout)
    assert report["clients"] == 3 and report["max_tokens"] == 16
    for n in (1, 3):
        runtime, server = report[f"batch_{n}_tokens_per_s"], report[f"clients_{n}_tokens_per_s"]
        assert runtime > 0 and server > 0
        assert report[f"server_over_runtime_{n}"] == pytest.approx(server / runtime)
        # Tokens were counted from the server's usage: its CPU per token is a real figure.
        assert 0 < report[f"clients_{n}_server_cpu_us_per_token"] < 1e6
    first_1, first_3 = report["clients_1_first_token_s"], report["clients_3_first_token_s"]
    assert 0 < first_1 and 0 < first_3
    assert report["first_token_n_over_1"] == pytest.approx(first_3 / first_1)
    assert "runtime alone" in r.stderr and "gptkit serve" in r.stderr  # progress lines


def test_bench_serve_without_a_folder_or_a_spec_is_a_clear_error(tmp_path):
    assert_user_error(run_cli("bench"), "give a spec file, or --serve")
    (tmp_path / "f.txt").write_text("x")
    assert_user_error(run_cli("bench", "--serve", tmp_path / "f.txt"), "not a folder")
