"""CI's compile check of the CUDA kernels: every csrc/cuda/*.cu must compile with nvcc for
sm_80 and sm_90a (the kernels are torch-free, so this works without a GPU or CUDA torch).

The check is for errors (C++, CUDA and inline-PTX through ptxas), not for code quality, so it
compiles at -O0 (measured on the 2-core CI machine: ffn.cu 121 s of CPU at -O3 vs 75 s at -O0)
and runs all files at once, one process per core. setup.py builds with -O3.
"""
import concurrent.futures
import os
import pathlib
import shutil
import subprocess

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
CU_FILES = sorted((ROOT / "csrc" / "cuda").glob("*.cu"))
NVCC = shutil.which("nvcc") or shutil.which(os.path.join(os.environ.get("CUDA_HOME", "/usr/local/cuda"), "bin", "nvcc"))


def _compile(cu: pathlib.Path, out_dir: pathlib.Path) -> subprocess.CompletedProcess:
    cmd = [NVCC, "-c", str(cu), "-o", str(out_dir / (cu.stem + ".o")), "-std=c++17", "-O0",
           "-Xptxas", "-O0", f"-I{ROOT / 'csrc'}", "--expt-relaxed-constexpr",
           "-DFUSEDFORMER_WITH_CUDA=1",
           "-gencode=arch=compute_80,code=sm_80", "-gencode=arch=compute_90a,code=sm_90a"]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    proc.args = " ".join(cmd)
    return proc


@pytest.fixture(scope="module")
def compiled(tmp_path_factory) -> dict[str, subprocess.CompletedProcess]:
    out_dir = tmp_path_factory.mktemp("nvcc")
    with concurrent.futures.ThreadPoolExecutor(max_workers=os.cpu_count() or 2) as pool:
        futures = {cu.name: pool.submit(_compile, cu, out_dir) for cu in CU_FILES}
        return {name: f.result() for name, f in futures.items()}


@pytest.mark.skipif(NVCC is None, reason="nvcc not found on PATH or in $CUDA_HOME")
@pytest.mark.parametrize("cu", CU_FILES, ids=[p.name for p in CU_FILES])
def test_cuda_source_compiles(cu, compiled):
    proc = compiled[cu.name]
    assert proc.returncode == 0, f"{proc.args}\n{proc.stdout}\n{proc.stderr}"
