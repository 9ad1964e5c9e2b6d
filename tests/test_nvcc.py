"""CI's compile check of the CUDA kernels: every csrc/cuda/*.cu must compile with nvcc for
sm_80 and sm_90a (the kernels are torch-free, so this works without a GPU or CUDA torch).
bindings.cpp's CUDA branches (device guard, current stream, launch checks) only build when torch
has CUDA; they are syntax-checked here against the c10/cuda headers that the CPU wheel also ships.

The check is for errors (C++, CUDA and inline-PTX through ptxas), not for code quality, so the
device code compiles unoptimized: -Xcicc -O0 and -Xptxas -O0 (nvcc's own -O0 is the host
code's). Every template is still instantiated and every line of PTX, inline asm included, still
goes through ptxas for the arch. Measured on the 2-core AMD dev machine (CUDA 13.0):
attention.cu for sm_90a 102 s with ptxas -O0 alone (cicc 48 s, ptxas 50 s) vs 22 s with both;
ffn.cu 55 s vs 9 s. The (file, arch) compiles share a pool of one process per core, attention.cu
first. setup.py builds with -O3, and `make ptxas-report` reads the -O3 registers and spills. One
check reads the machine code: the sm_90a attention and FFN kernels' products must be warpgroup
MMA (HGMMA) in the sm_90a cubin and absent from the sm_80 one (cuobjdump, as shipped with CUDA
or with the triton wheel).

C++ standard: torch 2.13's cpp_extension builds extensions as C++20, but torch up to 2.12 builds
them as C++17 (the GPU machine has torch 2.11), so every source must be valid C++17: the .cu
files and bindings.cpp are checked as C++17 here, and so are the CPU kernels (with g++, for
each vector ISA that setup.py may pick). A dependent `L::V` without `typename` (C++20 allows it)
once built here and would have failed the GPU machine's build.
"""
import concurrent.futures
import os
import pathlib
import shutil
import re
import subprocess
import sysconfig

import pytest
from torch.utils import cpp_extension

from bench.ptxas_report import count_loop_spills, cuobjdump as _cuobjdump, nvcc_command

ROOT = pathlib.Path(__file__).resolve().parents[1]
CU_FILES = sorted((ROOT / "csrc" / "cuda").glob("*.cu"))
NVCC = shutil.which("nvcc") or shutil.which(os.path.join(os.environ.get("CUDA_HOME", "/usr/local/cuda"), "bin", "nvcc"))


ARCHS = ("80", "90a")


def _compile(cu: pathlib.Path, out_dir: pathlib.Path, arch: str) -> subprocess.CompletedProcess:
    obj = out_dir / f"{cu.stem}.sm_{arch}.o"
    cmd = nvcc_command(NVCC, cu, obj, arch, "-O0", "-Xcicc", "-O0", "-Xptxas", "-O0")
    proc = subprocess.run(cmd, capture_output=True, text=True)
    proc.args = " ".join(cmd)
    proc.obj = obj
    return proc


TORCH_INCLUDES = cpp_extension.include_paths()
HAS_C10_CUDA = any(pathlib.Path(d, "c10", "cuda", "CUDAGuard.h").exists() for d in TORCH_INCLUDES)


def _check_bindings() -> subprocess.CompletedProcess:
    """Syntax-check bindings.cpp as setup.py compiles it for a CUDA build (host code only: nvcc
    supplies the CUDA runtime headers that c10/cuda includes). The CPU wheel lacks the
    cmake-generated c10/cuda/impl/cuda_cmake_macros.h; C10_USING_CUSTOM_GENERATED_MACROS is
    c10's own switch for building without it."""
    cmd = [NVCC, "-x", "c++", "-std=c++17", "-Xcompiler", "-fsyntax-only", "-c",
           str(ROOT / "csrc" / "bindings.cpp"), "-o", os.devnull,
           "-DFUSEDFORMER_WITH_CUDA=1", "-DC10_USING_CUSTOM_GENERATED_MACROS", "-DTORCH_API_INCLUDE_EXTENSION_H", "-DTORCH_EXTENSION_NAME=_C",
           f"-I{ROOT / 'csrc'}", f"-I{sysconfig.get_paths()['include']}",
           *(f"-I{d}" for d in TORCH_INCLUDES)]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    proc.args = " ".join(cmd)
    return proc


@pytest.fixture(scope="module")
def compiled(tmp_path_factory) -> dict[str, list[subprocess.CompletedProcess]]:
    """File name -> its compiles, one per arch of ARCHS (bindings.cpp: its one syntax check)."""
    out_dir = tmp_path_factory.mktemp("nvcc")
    with concurrent.futures.ThreadPoolExecutor(max_workers=os.cpu_count() or 2) as pool:
        # attention.cu first: the longest, so that the short files fill the other core after it starts
        order = sorted(CU_FILES, key=lambda cu: cu.name != "attention.cu")
        futures = {(cu.name, arch): pool.submit(_compile, cu, out_dir, arch) for cu in order for arch in ARCHS}
        if HAS_C10_CUDA:
            futures[("bindings.cpp", "")] = pool.submit(_check_bindings)
        results: dict[str, list[subprocess.CompletedProcess]] = {}
        for (name, _), future in futures.items():
            results.setdefault(name, []).append(future.result())
        return results


@pytest.mark.skipif(NVCC is None, reason="nvcc not found on PATH or in $CUDA_HOME")
@pytest.mark.parametrize("cu", CU_FILES, ids=[p.name for p in CU_FILES])
def test_cuda_source_compiles(cu, compiled):
    for proc in compiled[cu.name]:
        assert proc.returncode == 0, f"{proc.args}\n{proc.stdout}\n{proc.stderr}"


@pytest.mark.skipif(NVCC is None, reason="nvcc not found on PATH or in $CUDA_HOME")
@pytest.mark.skipif(not HAS_C10_CUDA, reason="this torch install ships no c10/cuda headers")
def test_bindings_cuda_branches_compile(compiled):
    (proc,) = compiled["bindings.cpp"]
    assert proc.returncode == 0, f"{proc.args}\n{proc.stdout}\n{proc.stderr}"


CXX = shutil.which("g++") or shutil.which("c++")
CPU_SOURCES = sorted((ROOT / "csrc" / "cpu").glob("*.cpp"))
AVX2 = ["-mavx2", "-mfma", "-mf16c"]
AVX512_BF16 = [*AVX2, "-mavx512f", "-mavx512bw", "-mavx512bf16"]


@pytest.mark.skipif(CXX is None, reason="no C++ compiler on PATH")
@pytest.mark.parametrize("isa", [[], AVX2, [*AVX2, "-mavx512f"], [*AVX512_BF16], [*AVX512_BF16, "-mamx-tile", "-mamx-bf16"]],
                         ids=["no-isa", "avx2", "avx512", "avx512bf16", "amx"])
def test_cpu_kernels_are_cxx17(isa):
    """The CPU kernels are torch-free, so only csrc/ is on the include path. Every ISA setup.py
    may pick, so that code for a CPU this machine is not (the AMX tiles, say) still compiles."""
    procs = [subprocess.Popen([CXX, "-std=c++17", "-fsyntax-only", "-fopenmp", *isa, f"-I{ROOT / 'csrc'}",
                               str(src)], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
             for src in CPU_SOURCES]  # all at once: a second core halves the test
    stderrs = [p.communicate()[1] for p in procs]
    errors = [f"{src.name}:\n{err}" for src, p, err in zip(CPU_SOURCES, procs, stderrs) if p.returncode != 0]
    assert not errors, "\n".join(errors)


def _sass_instructions(obj: pathlib.Path, opcode: str, match: str) -> dict[tuple[str, str], int]:
    """(arch, kernel) -> how many `opcode` instructions its SASS holds, for the kernels whose
    name contains `match` (dumped by name: the whole -O0 SASS of attention.cu is 3.5M lines)."""
    tool = _cuobjdump()
    symbols = subprocess.run([tool, "--dump-elf-symbols", str(obj)], capture_output=True, text=True, check=True).stdout
    names = sorted(set(re.findall(rf"\b(_Z\w*{match}\w*)", symbols)))
    assert names, f"no kernel named *{match}* in {obj.name}"
    sass = subprocess.run([tool, "--dump-sass", "--function", ",".join(names), str(obj)],
                          capture_output=True, text=True, check=True).stdout
    counts: dict[tuple[str, str], int] = {}
    arch = kernel = ""
    for line in sass.splitlines():
        if m := re.match(r"\s*arch = (\w+)", line):
            arch = m.group(1)
        elif m := re.match(r"\s*Function : (\S+)", line):
            kernel = m.group(1)
            counts[(arch, kernel)] = 0
        elif re.search(rf"\b{opcode}\b", line):
            counts[(arch, kernel)] += 1
    return counts


@pytest.fixture(scope="module")
def wgmma_sass(compiled) -> dict[str, dict[tuple[str, str], int]]:
    """attention.cu and ffn.cu -> (arch, kernel) -> HGMMA count of their *wgmma* kernels, over
    both arch objects, the four SASS dumps run at once (each is seconds of cuobjdump)."""
    files = ("attention.cu", "ffn.cu")
    for name in files:
        for proc in compiled[name]:
            assert proc.returncode == 0, proc.stderr
    with concurrent.futures.ThreadPoolExecutor(max_workers=os.cpu_count() or 2) as pool:
        dumps = {(name, proc.obj): pool.submit(_sass_instructions, proc.obj, "HGMMA", "wgmma")
                 for name in files for proc in compiled[name]}
        counts: dict[str, dict[tuple[str, str], int]] = {name: {} for name in files}
        for (name, _), future in dumps.items():
            counts[name].update(future.result())
        return counts


@pytest.mark.skipif(NVCC is None, reason="nvcc not found on PATH or in $CUDA_HOME")
@pytest.mark.skipif(_cuobjdump() is None, reason="no cuobjdump (CUDA toolkit or triton wheel)")
@pytest.mark.parametrize("cu,kernels", [("attention.cu", (3 + 2 + 2) * 2), ("ffn.cu", 6 * 2)],
                         ids=["attention", "ffn"])
def test_wgmma_kernels_are_warpgroup_mma_on_sm90a_only(wgmma_sass, cu, kernels):
    """attention: the forward at D = 64, 128, 256 and dK/dV and dQ at D = 64, 128, x bf16,
    fp16; ffn: the GEMM's six (epilogue, layout) instantiations x bf16, fp16. Each in both
    cubins."""
    wgmma = wgmma_sass[cu]
    assert len(wgmma) == kernels * 2, sorted(wgmma)
    for (arch, kernel), n in wgmma.items():
        if arch == "sm_90a":
            assert n > 0, f"{kernel}: no HGMMA in its sm_90a SASS"
        else:
            assert n == 0, f"{kernel}: HGMMA in its {arch} SASS"


def test_loop_spills_counts_local_memory_inside_the_longest_loop():
    """bench/ptxas_report.py's "loop spills" column, on SASS in cuobjdump's format: the loop
    0x0040-0x00a0 (its backward branch is the longest) holds one LDL and one STL; the spills
    before it and the short loop's after it do not count."""
    sass = """
        /*0000*/                   STL [R1], R2 ;
        /*0010*/                   MOV R3, R4 ;
        /*0040*/                   LDL R38, [R1] ;
        /*0050*/                   HMMA.16816.F32.BF16 R4, R8, R12, R4 ;
        /*0060*/              @P0  STL [R1+0x4], R5 ;
        /*0070*/              @!P1 BRA 0x90 ;
        /*0080*/                   FADD R5, R5, R6 ;
        /*00a0*/              @!P0 BRA 0x40 ;
        /*00b0*/                   LDL.LU R0, [R1+0x4] ;
        /*00c0*/               @P2 BRA 0xb0 ;
        /*00d0*/                   EXIT ;
    """
    assert count_loop_spills(sass) == 2
    assert count_loop_spills("/*0000*/ STL [R1], R2 ;\n/*0010*/ EXIT ;") == 0
