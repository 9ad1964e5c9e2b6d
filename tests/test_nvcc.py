"""CI's compile check of the CUDA kernels: every csrc/cuda/*.cu must compile with nvcc for
sm_80 and sm_90a (the kernels are torch-free, so this works without a GPU or CUDA torch)."""
import os
import pathlib
import shutil
import subprocess

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
CU_FILES = sorted((ROOT / "csrc" / "cuda").glob("*.cu"))
NVCC = shutil.which("nvcc") or (shutil.which(os.path.join(os.environ.get("CUDA_HOME", "/usr/local/cuda"), "bin", "nvcc")))


@pytest.mark.skipif(NVCC is None, reason="nvcc not found on PATH or in $CUDA_HOME")
@pytest.mark.parametrize("cu", CU_FILES, ids=[p.name for p in CU_FILES])
def test_cuda_source_compiles(cu, tmp_path):
    cmd = [NVCC, "-c", str(cu), "-o", str(tmp_path / (cu.stem + ".o")), "-std=c++17", "-O2",
           f"-I{ROOT / 'csrc'}", "--expt-relaxed-constexpr", "-DFUSEDFORMER_WITH_CUDA=1",
           "-gencode=arch=compute_80,code=sm_80", "-gencode=arch=compute_90a,code=sm_90a"]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    assert proc.returncode == 0, f"{' '.join(cmd)}\n{proc.stdout}\n{proc.stderr}"

