"""The CUDA kernels, executed on the CPU: csrc/cuda/*.cu compiled with g++ against the emulator
in tests/cuda_emu/ (threads as fibers with real barriers and warp shuffles, mma.sync fragments
per the PTX layouts, exact shared-memory sizes poisoned with NaN; see cuda_shim.h for what is
and is not emulated) and checked against an fp64 reference by the drivers there.

The kernel source is the real file, read at test time: C++ has no syntax for a kernel launch or a
__shared__ array, so `_emulated_source` rewrites exactly those (launches, `extern __shared__`,
static `__shared__`) into calls of the emulator, and nothing else; the inline-PTX helpers that
the emulator replaces (csrc/cuda/tensor_core.cuh: mma_16816, ldmatrix_x4[_trans], cp_async16,
cp_async_commit, cp_async_wait, and the sm_90a wgmma helpers) call it under
FUSEDFORMER_CUDA_EMULATION. ldmatrix reads the row
addresses that the other lanes publish, as the hardware does; cp.async copies
are queued per thread and land only at that thread's wait_group (cp_async.h), so a missing or
misplaced wait reads stale shared memory (NaN poison or the previous stage).

Each driver is compiled at -O1 and its cases are split over two processes, one per core; every
driver runs with the threads resumed in forward and in reverse order at every barrier (a missing
barrier that one order hides shows in the other), and all but attention also in a pseudo-random
order. ffn covers forward and backward (y, pre, d_pre, dx, dw1, db1, dw2, db2) for relu / gelu /
gelu_tanh / swiglu in fp32 (SIMT GEMM) and bf16 / fp16 (mma.sync with the cp.async pipeline into
row tiles and k tiles, and the scalar loads), with and without biases, dropout 0 and 0.2, shapes
off the tile multiples.
The attention and ffn drivers run every 16-bit case twice, on an emulated sm_80 device (the
mma.sync kernels) and an emulated sm_90a one (the wgmma kernels, tests/cuda_emu/wgmma.h).
Measured on the 2-core AMD dev machine (2026-12-03): the attention driver's four runs (two
orders, two shards) 156 s of CPU with glibc's swapcontext and libgcc's fp16 conversion, 44 s with
fibers.h's own switch and cuda_shim.h's fp16 table; the module about 48 s (attention in the
random order too would add 20 s), 52 s with the attention driver's far cases (its tensors'
last batch past 2^31 elements, driver::FarRegion; 2026-12-04).
"""
import concurrent.futures
import os
import pathlib
import platform
import re
import shutil
import subprocess

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
CUDA_DIR = ROOT / "csrc" / "cuda"
EMU_DIR = ROOT / "tests" / "cuda_emu"
GXX = shutil.which("g++")
SHARDS = 2

# kernel<<<cfg>>>(  ->  ::emu::launch(kernel, cfg)(   (the kernel: a name with template arguments)
_LAUNCH = re.compile(r"\b([A-Za-z_]\w*(?:<[^<>;]*>)?)\s*<<<(.*?)>>>\s*\(", re.S)
# extern __shared__ [__align__(n)] T name[];  ->  T* const name = ::emu::dynamic_shared<T>();
_DYNAMIC = re.compile(r"\bextern\s+__shared__\s+(?:__align__\(\d+\)\s+)?([\w:]+(?:\s+[\w:]+)*?)\s+(\w+)\s*\[\s*\]\s*;")
# __shared__ T name[N]...;  ->  static T name[N]...; ::emu::static_shared(name);
_STATIC = re.compile(r"\b__shared__\s+([^;]*?)\b(\w+)\s*((?:\[[^\]]*\]\s*)+);")


def _emulated_source(text: str) -> str:
    text = _LAUNCH.sub(r"::emu::launch(\1, \2)(", text)
    text = _DYNAMIC.sub(r"\1* const \2 = ::emu::dynamic_shared<\1>();", text)
    return _STATIC.sub(r"static \1\2\3; ::emu::static_shared(\2);", text)


def _has_ucontext() -> bool:
    if GXX is None:
        return False
    probe = subprocess.run([GXX, "-x", "c++", "-fsyntax-only", "-"], input="#include <ucontext.h>\n",
                           capture_output=True, text=True)
    return probe.returncode == 0


pytestmark = pytest.mark.skipif(not _has_ucontext(), reason="needs g++ and <ucontext.h> (glibc) for the CUDA emulator")

DRIVERS = ["attention", "layer_norm", "softmax", "ffn"]
# (driver, scheduling order): 0 forward, 1 reverse, 2 random (tests/cuda_emu/fibers.h). The
# attention driver in the two orders (a random third added 20 s to the module), the others in all three.
RUNS = [(name, order) for name in DRIVERS for order in ((0, 1) if name == "attention" else (0, 1, 2))]


def _build(name: str, src_dir: pathlib.Path, out_dir: pathlib.Path) -> subprocess.CompletedProcess:
    exe = out_dir / name
    # x86-64: fibers.h's stack switch returns into fibers that no call entered, which a CET
    # shadow stack would fault on; built without CET marking, the binary never runs with one.
    cet = ["-fcf-protection=none"] if platform.machine() in ("x86_64", "AMD64") else []
    cmd = [GXX, "-std=c++17", "-O1", "-g0", *cet, "-Wno-unknown-pragmas", "-DFUSEDFORMER_CUDA_EMULATION=1",
           "-DFUSEDFORMER_WITH_CUDA=1", f"-I{src_dir}", f"-I{CUDA_DIR}", f"-I{EMU_DIR / 'include'}", f"-I{EMU_DIR}",
           str(EMU_DIR / f"{name}.cpp"), "-o", str(exe)]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    proc.args = " ".join(cmd)
    return proc


def _run(exe: pathlib.Path, order: int, shard: int) -> subprocess.CompletedProcess:
    return subprocess.run([str(exe), str(order), str(shard), str(SHARDS)], capture_output=True, text=True, timeout=300)


@pytest.fixture(scope="module")
def results(tmp_path_factory) -> dict:
    src_dir = tmp_path_factory.mktemp("emu_src") / "cuda"
    src_dir.mkdir()
    for f in [*CUDA_DIR.glob("*.cu"), *CUDA_DIR.glob("*.cuh")]:
        (src_dir / f.name).write_text(_emulated_source(f.read_text()))
    out_dir = tmp_path_factory.mktemp("emu_bin")
    with concurrent.futures.ThreadPoolExecutor(max_workers=os.cpu_count() or 2) as pool:
        builds = {name: pool.submit(_build, name, src_dir, out_dir) for name in DRIVERS}
        builds = {name: f.result() for name, f in builds.items()}
        runs = {(name, order, shard): pool.submit(_run, out_dir / name, order, shard)
                for name, order in RUNS if builds[name].returncode == 0 for shard in range(SHARDS)}
        return {"builds": builds, "runs": {key: f.result() for key, f in runs.items()}}


@pytest.mark.parametrize("name,order", RUNS, ids=[f"{n}-order{o}" for n, o in RUNS])
def test_emulated(results, name, order):
    build = results["builds"][name]
    assert build.returncode == 0, f"{build.args}\n{build.stderr[-6000:]}"
    for shard in range(SHARDS):
        proc = results["runs"][(name, order, shard)]
        table = proc.stdout + proc.stderr
        assert proc.returncode == 0, f"{name} (order {order}, shard {shard}/{SHARDS}) failed:\n{table}"
        assert "FAIL" not in table and " 0 failures" in " " + table.splitlines()[-1], table
