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


def test_the_text_report_shows_the_cpu_per_token_beside_the_ratios():
    """The README says the CPU per token is "reported beside the ratios"; it was in --json
    only."""
    from gptkit.bench.serve import format_serving

    report = {
        "path": "b", "max_tokens": 16, "temperature": 1.0, "clients": 8,
        "batch_1_tokens_per_s": 2000.0, "clients_1_tokens_per_s": 1900.0,
        "server_over_runtime_1": 0.95, "clients_1_first_token_s": 0.003,
        "batch_8_tokens_per_s": 9000.0, "clients_8_tokens_per_s": 8000.0,
        "server_over_runtime_8": 0.89, "clients_8_first_token_s": 0.0066,
        "first_token_n_over_1": 2.2,
        "clients_1_server_cpu_us_per_token": 519.4, "clients_8_server_cpu_us_per_token": 145.2,
        "clients_1_client_cpu_us_per_token": 80.0, "clients_8_client_cpu_us_per_token": 95.0,
    }  # fmt: skip
    text = format_serving(report)
    assert "CPU per token, 1 / 8 clients: server 519 / 145 us, clients 80 / 95 us" in text
