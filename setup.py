"""Build fusedformer: one import package from two folders, plus the C++/CUDA extension.

    transformer/  -> fusedformer          (the model layer and public API)
    kernels/      -> fusedformer.kernels  (ops: Triton kernels, oracle, dispatch)
    csrc/         -> fusedformer._C       (pybind11: C++ CPU kernels, CUDA kernels when possible)

Environment:
    FUSEDFORMER_SKIP_CUDA_BUILD=1   build the CPU kernels only, even when nvcc and CUDA torch exist
    FUSEDFORMER_CUDA_ARCHS="80;90a" the CUDA architectures to build for
    FUSEDFORMER_CPU_FLAGS="..."     the ISA flags for the C++ CPU kernels; default: AVX2 + FMA + F16C (+ AVX-512F)
                                    when the building machine has them (x86-64), else none. Set it
                                    to "" for a binary that runs on any x86-64 CPU.
    MAX_JOBS                        parallel compile jobs (ninja)
"""
import glob
import os
import shutil

from setuptools import setup

ROOT = os.path.dirname(os.path.abspath(__file__))


def _cuda_build_reason() -> str | None:
    """None when the CUDA sources should be built, else why not."""
    import torch

    if os.environ.get("FUSEDFORMER_SKIP_CUDA_BUILD", "0") == "1":
        return "FUSEDFORMER_SKIP_CUDA_BUILD=1"
    if torch.version.cuda is None:
        return "torch is a CPU build"
    from torch.utils.cpp_extension import CUDA_HOME

    if CUDA_HOME is None or shutil.which(os.path.join(CUDA_HOME, "bin", "nvcc")) is None:
        return "nvcc not found"
    return None


def _cpu_isa_flags() -> list[str]:
    """The vector ISA for the CPU kernels: the building machine's AVX2 + FMA + F16C (+ AVX-512F)
    if it has them. Without them -O3 emits SSE2 only (4-wide, no FMA, no hardware fp16 conversion) and the
    kernels run 2-4x slower. The extension refuses to load on a CPU without the ISA it was built
    for (see csrc/bindings.cpp), so a binary moved to an older machine fails with a clear error."""
    env = os.environ.get("FUSEDFORMER_CPU_FLAGS")
    if env is not None:
        return env.split()
    try:
        with open("/proc/cpuinfo") as f:
            flags = next((line.split(":", 1)[1].split() for line in f if line.startswith("flags")), [])
    except OSError:
        return []
    if not {"avx2", "fma", "f16c"} <= set(flags):
        return []
    # AVX-512F widens the attention micro-GEMM to 16 lanes (csrc/cpu/attention_tiles.h);
    # AVX512_BF16 gives bf16 decoding its dot-product instruction (csrc/cpu/attention.cpp).
    isa = ["-mavx2", "-mfma", "-mf16c"]
    if "avx512f" in flags:
        isa.append("-mavx512f")
        if {"avx512bw", "avx512_bf16"} <= set(flags):
            isa += ["-mavx512bw", "-mavx512bf16"]
        # AMX: the tile products of the bf16 attention forward and backward (csrc/cpu/attention.cpp).
        # Only their intrinsics emit AMX code, run after the kernel asks Linux for the tile state.
        if {"amx_tile", "amx_bf16"} <= set(flags):
            isa += ["-mamx-tile", "-mamx-bf16"]
    return isa


def _gencode_flags(archs: str) -> list[str]:
    flags = []
    for arch in archs.replace(",", ";").split(";"):
        arch = arch.strip()
        if arch:
            flags.append(f"-gencode=arch=compute_{arch},code=sm_{arch}")
    return flags


def _extension():
    from torch.utils.cpp_extension import CppExtension, CUDAExtension

    cpu_sources = sorted(glob.glob("csrc/cpu/*.cpp")) + ["csrc/bindings.cpp"]
    cxx_flags = ["-O3", "-fopenmp", *_cpu_isa_flags()]  # C++ standard from torch (C++20 for 2.13)
    include_dirs = [os.path.join(ROOT, "csrc")]
    reason = _cuda_build_reason()
    if reason is None:
        archs = os.environ.get("FUSEDFORMER_CUDA_ARCHS", "80;90a")
        # No --use_fast_math: it turns every libm call approximate (tanhf became tanh.approx.f32,
        # 2^-11 relative error, far outside fp32 gelu_tanh's tolerance). Where speed matters the
        # kernels call the intrinsic themselves (__expf, __logf in attention and softmax).
        nvcc_flags = ["-O3", "-lineinfo",
                      "--expt-relaxed-constexpr", "-U__CUDA_NO_HALF_OPERATORS__",
                      "-U__CUDA_NO_HALF_CONVERSIONS__", "-U__CUDA_NO_BFLOAT16_CONVERSIONS__",
                      *_gencode_flags(archs)]
        return CUDAExtension(
            "fusedformer._C",
            cpu_sources + sorted(glob.glob("csrc/cuda/*.cu")),
            include_dirs=include_dirs,
            define_macros=[("FUSEDFORMER_WITH_CUDA", "1")],
            extra_compile_args={"cxx": cxx_flags, "nvcc": nvcc_flags},
            extra_link_args=["-fopenmp"],
        )
    print(f"fusedformer: building the CPU extension only ({reason})")
    return CppExtension(
        "fusedformer._C",
        cpu_sources,
        include_dirs=include_dirs,
        define_macros=[("FUSEDFORMER_CUDA_SKIP_REASON", f'"{reason}"')],
        extra_compile_args={"cxx": cxx_flags},
        extra_link_args=["-fopenmp"],
    )


def _cmdclass():
    from torch.utils.cpp_extension import BuildExtension

    return {"build_ext": BuildExtension.with_options(use_ninja=True)}


setup(
    name="fusedformer",
    version="0.1.0",
    description="Fused Triton and CUDA C++ kernels for Transformers: attention, LayerNorm, FFN",
    python_requires=">=3.10",
    packages=["fusedformer", "fusedformer.kernels"],
    package_dir={"fusedformer": "transformer", "fusedformer.kernels": "kernels"},
    ext_modules=[_extension()],
    cmdclass=_cmdclass(),
    entry_points={"console_scripts": ["fusedformer = fusedformer.cli:main"]},
)
