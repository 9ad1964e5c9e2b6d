"""bench/gpu_run.py, the one device call of a GPU session, and the streamed benchmark rows it
brings back. Its stage plumbing is tested here with stand-in commands, on the CPU: a GPU session
is too short to find out then that a cut-off stage loses its log."""
from __future__ import annotations

import glob
import os
import subprocess
import sys
import time

from bench import bench_ceilings, gpu_run
from bench.gpu_run import OUT_FILES, Result, Stage, run_stages

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _sh(script: str) -> list[str]:
    return ["sh", "-c", script]


def test_stages_run_in_order_under_their_caps(tmp_path):
    start = time.monotonic()
    results = run_stages([
        Stage("first", _sh("echo one; echo '2 passed'"), "a.log", 10),
        Stage("fails", _sh("echo broken; exit 3"), "a.log", 10),
        # A child that outlives its parent's kill would hold the run past its cap: the whole
        # process group goes.
        Stage("slow", _sh("sleep 30 & echo started; sleep 30"), "b.log", 1),
        Stage("skipped", _sh("echo never"), "b.log", 10, when=lambda r: r["fails"].status == "ok"),
        Stage("absent", ["/nonexistent/tool"], "b.log", 10),
        Stage("nothing", _sh("exit 5"), "b.log", 10),  # pytest: no test selected
        Stage("pair", _sh("sleep 0.2; echo left"), "c.log", 10, parallel=Stage("other", _sh("echo right"), "d.log", 10)),
    ], str(tmp_path), budget=20, header="run header")
    assert time.monotonic() - start < 8
    assert {name: r.status for name, r in results.items()} == {
        "first": "ok", "fails": "failed (exit 3)", "slow": "timed out", "skipped": "skipped",
        "absent": "failed (no start)", "nothing": "skipped: no tests", "pair": "ok", "other": "ok"}
    assert results["first"].last_line == "2 passed"
    log = (tmp_path / "a.log").read_text()  # stages sharing a file append, in order
    assert log.index("one") < log.index("broken") and "[fails: failed (exit 3) after" in log
    assert "started" in (tmp_path / "b.log").read_text() and "never" not in (tmp_path / "b.log").read_text()
    assert "\nleft\n" in (tmp_path / "c.log").read_text() and "right" in (tmp_path / "d.log").read_text()
    summary = (tmp_path / "summary.txt").read_text()
    assert summary.startswith("run header")
    for name, status in (("slow", "timed out"), ("fails", "failed (exit 3)"), ("other", "ok")):
        assert any(line.split()[:1] == [name] and status in line for line in summary.splitlines()), summary


def test_the_deadline_cuts_a_stage_short_and_later_stages_do_not_start(tmp_path):
    start = time.monotonic()
    results = run_stages([Stage("long", _sh("echo partial; sleep 30"), "a.log", 60),
                          Stage("later", _sh("echo never"), "a.log", 60)],
                         str(tmp_path), budget=2)
    assert time.monotonic() - start < 6
    assert results["long"].status == "timed out" and results["later"].status == "not run: no time"
    assert "partial" in (tmp_path / "a.log").read_text()  # what it printed before the cut stays
    assert "not run: no time" in (tmp_path / "summary.txt").read_text()


def by_name_of(stages: list[Stage]) -> dict[str, Stage]:
    return {s.name: s for s in stages}


def test_the_plan_writes_only_the_eight_files_the_device_brings_back(tmp_path):
    plan = gpu_run.default_stages("python3", str(tmp_path), "90a", 16, 12, gpu_run.BENCH_PLAN, test_timeout=True)
    stages = plan + [s.parallel for s in plan if s.parallel]
    assert len(OUT_FILES) <= 8 and {s.log for s in stages} | {"summary.txt"} <= set(OUT_FILES)
    for s in stages:  # every other file it writes is one of OUT_FILES in --out
        for arg in s.argv:
            if arg.startswith("--junitxml="):
                assert arg == f"--junitxml={tmp_path / 'tests.xml'}"
        if "FUSEDFORMER_BENCH_JSONL" in s.env:
            assert s.env["FUSEDFORMER_BENCH_JSONL"] == str(tmp_path / "bench.jsonl")
    assert by_name_of(stages)["build"].env["FUSEDFORMER_CUDA_ARCHS"] == "90a"
    no_gpu = gpu_run.default_stages("python3", str(tmp_path), "", 16, 1, [])
    assert "FUSEDFORMER_CUDA_ARCHS" not in by_name_of(no_gpu)["build"].env  # setup.py's default
    # The test tier streams each outcome and survives a hung kernel (a worker is replaced).
    tests = by_name_of(stages)["tests"].argv
    assert "-v" in tests and "--timeout-method=thread" in tests and "--max-worker-restart=8" in tests
    # Every benchmark file is in the plan, so a new one is not silently left out of GPU runs.
    planned = {arg for _, args, _, _ in gpu_run.BENCH_PLAN for arg in args if arg.endswith(".py")}
    assert planned == {os.path.relpath(p, ROOT) for p in glob.glob(os.path.join(ROOT, "bench", "bench_*.py"))}
    # The CPU-only build stands in only when the CUDA build failed, and the rest needs one of them.
    by_name = by_name_of(stages)
    failed = {"build": Result("failed (exit 1)", 1), "build-cpu": Result("skipped", 0)}
    assert by_name["build-cpu"].when(failed) and not by_name["tests"].when(failed)
    assert by_name["tests"].when({**failed, "build-cpu": Result("ok", 1)})


def test_benchmark_rows_stream_to_jsonl_and_report_divides_by_the_ceilings(tmp_path):
    rows = tmp_path / "bench.jsonl"
    env = {**os.environ, "FUSEDFORMER_BENCH_JSONL": str(rows)}
    subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "--benchmark-only",
                    "bench/bench_ceilings.py"], cwd=ROOT, env=env, check=True, capture_output=True)
    lines = rows.read_text().splitlines()
    expected = 1 + len(bench_ceilings.MATMUL_DTYPES)  # the copy, a matmul per dtype (fp32 and bf16 on a CPU)
    assert len(lines) == expected  # one per benchmark, written as it finished
    report = subprocess.run([sys.executable, "bench/report.py", str(rows)], cwd=ROOT, check=True,
                            capture_output=True, text=True).stdout
    assert "# ceilings: copy" in report and "matmul" in report
    assert sum(" 100% " in line for line in report.splitlines()) == expected  # each ceiling is its own 100%


def test_the_summary_lists_failed_tests_from_the_verbose_log(tmp_path):
    (tmp_path / "tests.log").write_text(
        "[gw0] [  1%] PASSED tests/test_a.py::test_one[cuda] \n"
        "[gw1] [  2%] FAILED tests/test_a.py::test_two[cuda-bf16] \n"
        "tests/test_b.py::test_three ERROR\n"
        "FAILED tests/test_a.py::test_two[cuda-bf16] - AssertionError: o: err 0.1\n")
    assert gpu_run.failed_tests(str(tmp_path / "tests.log")) == [
        "tests/test_a.py::test_two[cuda-bf16]", "tests/test_b.py::test_three"]
    gpu_run.write_summary(str(tmp_path), "h", {"tests": Result("failed (exit 1)", 3.0)}, 10)
    summary = (tmp_path / "summary.txt").read_text()
    assert "2 failed in tests.log" in summary and "  tests/test_b.py::test_three" in summary
