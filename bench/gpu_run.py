"""One device call that fits a lease: build, check, the `gpu` test tier and a benchmark pass.

    python3 bench/gpu_run.py --out "$OUT"            # make gpu-check does this

Why it is shaped this way (/work/.library/device/README.md): device time is 15 minutes a
session with the machine's start counted in, one command runs at most 10 minutes, and at most
8 files come back from $OUT. So:
- stages run in the order of what a GPU session most needs to learn (does it build, is it
  right, how fast), each under its own cap and all of them under one deadline (--budget,
  default 540 s: a 600 s command with a margin);
- every stage writes its log straight into --out while it runs, summary.txt is rewritten after
  each stage, and benchmark rows are streamed one JSON line each (FUSEDFORMER_BENCH_JSONL), so
  a stage cut off by its cap still leaves everything it did;
- the files are exactly OUT_FILES, eight;
- if the CUDA build fails, the CPU-only build goes in instead and the Triton half still runs.

Stdlib only: it runs under the GPU machine's own python3, which has torch but no venv.
"""
from __future__ import annotations

import argparse
import dataclasses
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# Everything the run leaves in --out; the device tool brings back at most eight files.
OUT_FILES = ("summary.txt", "build.log", "check.txt", "tests.log", "tests.xml", "tests-mma.log",
             "bench.log", "bench.jsonl")


@dataclasses.dataclass
class Stage:
    """One command. `log` is its file in OUT_FILES (appended to: several stages may share one);
    `cap` its own limit in seconds; `when` decides from the results so far whether it runs;
    `parallel` names another Stage started alongside it and waited for with it."""
    name: str
    argv: list[str]
    log: str
    cap: float
    env: dict[str, str] = dataclasses.field(default_factory=dict)
    when: Callable[[dict[str, "Result"]], bool] = lambda results: True
    parallel: "Stage | None" = None


@dataclasses.dataclass
class Result:
    status: str  # ok, failed (exit N), failed (no start), timed out, skipped[: no tests], not run: no time
    seconds: float
    last_line: str = ""


def _last_line(path: str) -> str:
    """The last non-blank line of a log (pytest's summary line), at most 160 characters."""
    try:
        with open(path, errors="replace") as f:
            lines = [line.strip() for line in f if line.strip()]
    except OSError:
        return ""
    return lines[-1][:160] if lines else ""


def _start(stage: Stage, out: str) -> tuple[subprocess.Popen | None, object]:
    """Start `stage` with its output appended to its log; (None, log) if it cannot start."""
    log = open(os.path.join(out, stage.log), "a")
    log.write(f"$ {' '.join(stage.argv)}\n")
    log.flush()
    try:
        # Its own process group, so that a timeout also ends pytest-xdist's workers and
        # ninja's compilers.
        proc = subprocess.Popen(stage.argv, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT,
                                env={**os.environ, **stage.env}, start_new_session=True)
    except OSError as e:
        log.write(f"cannot start: {e}\n")
        return None, log
    return proc, log


def _finish(stage: Stage, proc: subprocess.Popen | None, log, out: str, started: float,
            limit: float) -> Result:
    if proc is None:
        status = "failed (no start)"
    else:
        try:
            code = proc.wait(timeout=max(0.0, started + limit - time.monotonic()))
            # pytest's 5: no test matched (the autotuned passes select Triton rows, none on a CPU)
            status = "ok" if code == 0 else "skipped: no tests" if code == 5 else f"failed (exit {code})"
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            status = "timed out"
    seconds = time.monotonic() - started
    log.flush()
    result = Result(status, seconds, _last_line(os.path.join(out, stage.log)))
    log.write(f"[{stage.name}: {status} after {seconds:.0f} s]\n")
    log.close()
    return result


def run_stages(stages: list[Stage], out: str, budget: float, header: str = "") -> dict[str, Result]:
    """Run `stages` in order under one deadline; return {name: Result}. summary.txt is
    rewritten after every stage."""
    os.makedirs(out, exist_ok=True)
    deadline = time.monotonic() + budget
    results: dict[str, Result] = {}
    for stage in stages:
        group = [stage] + ([stage.parallel] if stage.parallel else [])
        left = deadline - time.monotonic()
        if not stage.when(results) or left < 1:
            reason = "skipped" if left >= 1 else "not run: no time"
            for s in group:
                results[s.name] = Result(reason, 0.0)
            continue
        started = time.monotonic()
        running = [(s, *_start(s, out)) for s in group]
        for s, proc, log in running:
            results[s.name] = _finish(s, proc, log, out, started, min(s.cap, left))
        write_summary(out, header, results, budget)
    write_summary(out, header, results, budget)
    return results


def failed_tests(path: str) -> list[str]:
    """The ids of the tests a pytest -v log reports FAILED or ERROR, in the order they ended
    (the -v lines come as tests end, the -r summary at the end repeats them)."""
    found: dict[str, None] = {}
    try:
        with open(path, errors="replace") as f:
            for line in f:
                words = line.split()
                if "FAILED" in words or "ERROR" in words:
                    test = next((w for w in words if "::" in w), None)
                    if test:
                        found.setdefault(test, None)
    except OSError:
        pass
    return list(found)


def write_summary(out: str, header: str, results: dict[str, Result], budget: float) -> None:
    lines = [header.rstrip(), "", f"{'stage':<14} {'status':<18} {'seconds':>7}  last line of its log",
             f"{'-' * 14} {'-' * 18} {'-' * 7}  {'-' * 40}"]
    for name, r in results.items():
        lines.append(f"{name:<14} {r.status:<18} {r.seconds:>7.0f}  {r.last_line}")
    total = sum(r.seconds for r in results.values())
    lines.append(f"\n{total:.0f} s of stage time (parallel stages counted each), budget {budget:.0f} s")
    for log in ("tests.log", "tests-mma.log"):
        failed = failed_tests(os.path.join(out, log))
        if failed:
            lines.append(f"\n{len(failed)} failed in {log} (the first 20):")
            lines += [f"  {t}" for t in failed[:20]]
    with open(os.path.join(out, "summary.txt"), "w") as f:
        f.write("\n".join(lines).lstrip("\n") + "\n")


def cuda_archs(python: str) -> str:
    """The GPU's own architecture for FUSEDFORMER_CUDA_ARCHS: "90a" on a Hopper (wgmma needs
    the arch-specific target), else e.g. "80"; "" if there is no GPU."""
    probe = ("import torch; c = torch.cuda.get_device_capability() if torch.cuda.is_available() else None;"
             "print('' if c is None else f'{c[0]}{c[1]}' + ('a' if c[0] == 9 else ''))")
    try:
        return subprocess.run([python, "-c", probe], capture_output=True, text=True,
                              timeout=120).stdout.strip()
    except (OSError, subprocess.TimeoutExpired):
        return ""


def _has_module(python: str, name: str) -> bool:
    probe = f"import importlib.util, sys; sys.exit(importlib.util.find_spec({name!r}) is None)"
    return subprocess.run([python, "-c", probe], capture_output=True).returncode == 0


BenchPass = tuple[str, list[str], float, dict[str, str]]  # label, pytest arguments, cap, environment


def default_stages(python: str, out: str, archs: str, jobs: int, test_workers: int,
                   bench_plan: list[BenchPass], test_timeout: bool = False) -> list[Stage]:
    """The GPU session's plan. Caps are first guesses (no run has timed these stages yet):
    summary.txt records what each took, to size the next run by. test_workers > 1 needs
    pytest-xdist, test_timeout pytest-timeout."""
    pip = [python, "-m", "pip", "install", "--no-deps", "--no-build-isolation", "-e", "."]
    # The GPU's own arch when torch sees one; else setup.py's default list (80 and 90a).
    build_env = {"MAX_JOBS": str(jobs), **({"FUSEDFORMER_CUDA_ARCHS": archs} if archs else {})}
    built = lambda r: "ok" in (r["build"].status, r["build-cpu"].status)
    # Tests: autotuning off (one fixed tile per kernel, else each test shape would benchmark
    # every config); several processes, since each first use of a Triton specialization
    # compiles on one core. -v streams each test's outcome into the log as it ends (the failure
    # summary and the junit XML come only at the end, which a cut-off run never reaches). A
    # kernel that hangs on the GPU cannot be interrupted from Python: pytest-timeout's thread
    # method ends the whole process after 120 s, and xdist replaces the worker and goes on.
    pytest = [python, "-m", "pytest", "-p", "no:cacheprovider", "-v", "-rfEs", "-m", "gpu"]
    if test_timeout:
        pytest += ["--timeout=120", "--timeout-method=thread"]
    # loadgroup: tests/test_large_offsets.py's tests, which take up to 30 GB each, run in one
    # worker, one after another.
    xdist = ["-n", str(test_workers), "--dist", "loadgroup", "--max-worker-restart=8"] if test_workers > 1 else []
    test_env = {"FUSEDFORMER_AUTOTUNE": "0", "PYTHONUNBUFFERED": "1"}
    # On an sm_90 the cuda backend's default is its wgmma kernels; its mma.sync ones must pass
    # there too, so its attention and FFN tests run again with them, alongside the main run.
    mma = Stage("tests-mma", pytest + ["tests/test_attention_cpp.py", "tests/test_ffn.py", "-k", "cuda-cuda"],
                "tests-mma.log", 240, {**test_env, "FUSEDFORMER_CUDA_WGMMA": "0"})
    bench_env = {"FUSEDFORMER_BENCH_JSONL": os.path.join(out, "bench.jsonl"), "PYTHONUNBUFFERED": "1"}
    # What the build depends on, logged first: a failed build is read against it.
    versions = ("import platform, shutil, subprocess, torch, triton; "
                "from torch.utils.cpp_extension import CUDA_HOME; "
                "print('python', platform.python_version(), '| torch', torch.__version__, 'cuda', torch.version.cuda, "
                "'| triton', triton.__version__, '| CUDA_HOME', CUDA_HOME); "
                "nvcc = shutil.which('nvcc') or (CUDA_HOME and CUDA_HOME + '/bin/nvcc'); "
                "print(subprocess.run([nvcc, '--version'], capture_output=True, text=True).stdout if nvcc else 'no nvcc')")
    return [
        Stage("versions", [python, "-c", versions], "build.log", 60),
        Stage("build", pip, "build.log", 240, build_env),
        Stage("build-cpu", pip, "build.log", 120, {**build_env, "FUSEDFORMER_SKIP_CUDA_BUILD": "1"},
              when=lambda r: r["build"].status != "ok"),
        Stage("smi", ["nvidia-smi"], "check.txt", 20),
        Stage("info", [python, "-m", "fusedformer", "info"], "check.txt", 60, when=built),
        Stage("check", [python, "-m", "fusedformer", "check"], "check.txt", 60, when=built),
        Stage("tests", pytest + xdist + [f"--junitxml={os.path.join(out, 'tests.xml')}", "tests"],
              "tests.log", 240, test_env, when=built, parallel=mma),
        *(Stage(f"bench:{label}", [python, "-m", "pytest", "-p", "no:cacheprovider", "-q", "--benchmark-only",
                                   *args], "bench.log", cap, {**bench_env, **env}, when=built)
          for label, args, cap, env in bench_plan),
    ]


# Benchmarks in the order a short run should measure them. First the ceilings (every % needs
# them), then every op with the Triton kernels on their fixed tiles (FUSEDFORMER_AUTOTUNE=0:
# the test stage has compiled most of them already), for a whole table soon; then the Triton
# attention and FFN again, autotuned, which compiles and times every config of each new key
# (the attention forward up to 8 configs x 16 keys, its dK/dV and dQ 4 each; minutes of
# compiling are possible there, so those passes come late and stream whatever rows they
# finish). FlexAttention, a peer that compiles per shape and mode, comes last of all.
FIXED = {"FUSEDFORMER_AUTOTUNE": "0"}
BENCH_PLAN: list[BenchPass] = [
    ("ceilings", ["bench/bench_ceilings.py"], 40, {}),
    ("fixed", ["bench/bench_layer_norm.py", "bench/bench_softmax.py", "bench/bench_attention.py",
               "bench/bench_ffn.py", "-k", "not flex"], 240, FIXED),
    ("attn-tuned", ["bench/bench_attention.py", "-k", "fusedformer-triton"], 150, {}),
    ("ffn-tuned", ["bench/bench_ffn.py", "-k", "fusedformer-triton"], 90, {}),
    ("flex", ["bench/bench_attention.py", "-k", "flex"], 90, {}),
]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", required=True, help="where the eight files go ($OUT on the device machine)")
    parser.add_argument("--budget", type=float, default=540, help="seconds for all stages together")
    parser.add_argument("--python", default=sys.executable, help="the interpreter that has torch")
    parser.add_argument("--no-bench", action="store_true", help="build, check and test only")
    args = parser.parse_args(argv)
    out = os.path.abspath(args.out)
    os.makedirs(out, exist_ok=True)
    for name in OUT_FILES:  # a rerun into the same folder starts clean
        if os.path.exists(os.path.join(out, name)):
            os.remove(os.path.join(out, name))

    archs = cuda_archs(args.python)
    cores = os.cpu_count() or 1
    workers = min(12, max(1, cores - 2)) if _has_module(args.python, "xdist") else 1
    stages = default_stages(args.python, out, archs, cores, workers, [] if args.no_bench else BENCH_PLAN,
                            test_timeout=_has_module(args.python, "pytest_timeout"))
    header = (f"fusedformer GPU run, {time.strftime('%Y-%m-%d %H:%M:%S UTC', time.gmtime())}, "
              f"archs={archs or 'none'}, cores={cores}, test workers={workers}")
    results = run_stages(stages, out, args.budget, header)
    # The device tool's reply holds the last 12,000 characters of output: the benchmark table
    # first, the stage summary last.
    if os.path.exists(os.path.join(out, "bench.jsonl")):
        subprocess.run([args.python, os.path.join(ROOT, "bench", "report.py"),
                        os.path.join(out, "bench.jsonl")], cwd=ROOT)
    print(open(os.path.join(out, "summary.txt")).read())
    return 0 if all(r.status.startswith(("ok", "skipped")) for r in results.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
