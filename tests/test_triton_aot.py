"""CI's compile check of the Triton kernels: every @triton.jit kernel that a launcher in
kernels/*.py launches must compile ahead of time for sm_90 (a few for sm_80 too) in the
configurations a GPU run uses, as test_nvcc.py compile-checks csrc/cuda. No GPU needed:
triton.compile with an explicit GPUTarget runs the whole pipeline (Triton IR, TTGIR, LLVM IR,
PTX, ptxas) on the CPU.

Why: the CPU tier runs the kernels under TRITON_INTERPRET=1, which executes them with numpy
and accepts programs the compiler rejects (layouts, dot shapes, dtype rules); there the
launchers also turn on the interpreter's bf16 workarounds (DOT_FP32 / RNE_BF16, DOT_F32 /
RNE), leave fp32 attention at the default dot precision instead of tf32x3 and never
autotune. Without this check the variants a GPU runs would first be compiled on the GPU.

How: worker processes without TRITON_INTERPRET (so the kernels are real JITFunctions and the
launchers choose what they choose on a GPU) call each launcher on small CPU tensors with
every kernel launch replaced by a recorder, so the arguments compiled are the launchers' own;
only attention's "tensors must be on a CUDA device" check is stubbed out. An autotuned launch
is expanded over its configs as the autotuner prunes them (Case.configs picks which),
specialized as Triton's launcher specializes it (ints equal to 1 become constants, pointers
and ints divisible by 16 get divisibility hints, the 62-bit dropout seed is an i64) and
compiled with triton.compile(ASTSource(...), target=GPUTarget("cuda", 90, 32)). Identical
compiles run once, shared out to one worker per core, in a fresh Triton cache.

Checks: each compile succeeds and yields PTX and a cubin; no interpreter workaround is on; a
fixed tile fits the target's shared memory (227 KiB on sm_90, 163 KiB on sm_80; an autotuned
config over it fails its benchmark with OutOfResources and the autotuner skips it, so that is
only reported); 16-bit attention and FFN GEMMs use tensor cores (mma or wgmma in the PTX).
Registers, spills and shared memory (ptxas -v) are printed, not asserted: run with -rP.
Measured on the 2-core dev machine: 40-80 s with triton 3.9, 30-60 s with 3.6 (by load). The sweep
(marked slow, and run only with FUSEDFORMER_AOT_SWEEP=1, since slow tests run by default here)
adds every autotune config, D = 256 and sm_80: ~4-7 min (3.9), ~3 min (3.6) more.
"""
from __future__ import annotations

import contextlib
import dataclasses
import importlib
import inspect
import io
import json
import math
import os
import pathlib
import re
import subprocess
import sys
import time

import pytest
import torch

SWEEP = os.environ.get("FUSEDFORMER_AOT_SWEEP", "0") == "1"
SM90_SHARED = 232448  # bytes of shared memory per block, opt-in maximum: H100
SM80_SHARED = 166912  # A100
WORKER_TIMEOUT_S = 1200
# The launchers' interpreter-only workarounds (attention: DOT_FP32, RNE_BF16; softmax,
# layer_norm, ffn: RNE, DOT_F32): all off on a GPU, so all off here.
INTERPRETER_FLAGS = ("DOT_FP32", "RNE_BF16", "DOT_F32", "RNE")
TENSOR_CORE_KERNELS = ("_attn_fwd_kernel", "_attn_bwd_dkdv_kernel", "_attn_bwd_dq_kernel",
                       "_ffn_gemm_kernel")  # with 16-bit operands


@dataclasses.dataclass(frozen=True)
class Case:
    """One launcher call (`launch` with `args`, see _launch_case), compiled for `archs`.
    configs: which of an autotuned launch's pruned configs to compile, "smallest",
    "extremes" (the largest and the smallest tile) or "all"; fixed-tile launches compile the
    one config the launcher passes."""
    id: str
    launch: str
    args: dict
    configs: str = "smallest"
    archs: tuple[int, ...] = (90,)
    slow: bool = False


BF16, FP16, FP32 = torch.bfloat16, torch.float16, torch.float32
CASES = [
    # attention: forward (autotuned for 16-bit; fixed tf32x3 tiles for fp32), the three
    # backward kernels (dK/dV and dQ autotuned for 16-bit at D <= 128, else fixed tiles), the
    # dropout keep-mask kernel; D = 80 runs padded to 128
    Case("attn-fwd-bf16-d128-causal", "attention_fwd", dict(dtype=BF16, d=128, causal=True),
         configs="extremes"),
    Case("attn-fwd-fp16-d80-boolmask-dropout", "attention_fwd",
         dict(dtype=FP16, d=80, mask="bool", dropout_p=0.1), archs=(90, 80)),
    Case("attn-fwd-fp32-d64-floatmask-causal", "attention_fwd",
         dict(dtype=FP32, d=64, mask="float", causal=True)),
    Case("attn-fwd-bf16-d72-l77-unaligned", "attention_fwd", dict(dtype=BF16, d=72, length=77)),
    # split-KV (decoding): the forward on fixed tiles with SPLIT, and the merge kernel
    Case("attn-fwd-bf16-d128-decode-split", "attention_fwd", dict(dtype=BF16, d=128, lq=1, length=1024, splits=8)),
    Case("attn-fwd-fp16-d80-boolmask-dropout-causal-split", "attention_fwd",
         dict(dtype=FP16, d=80, mask="bool", dropout_p=0.1, causal=True, splits=3)),
    # packed GQA (decoding: the harness's 2 query heads a kv head as one tile's rows), alone
    # (the split decoding case above packs too)
    Case("attn-fwd-bf16-d128-floatmask-dropout-causal-decode-pack", "attention_fwd",
         dict(dtype=BF16, d=128, mask="float", dropout_p=0.1, causal=True, lq=3, length=1024)),
    # the opt-in TMA forward (FUSEDFORMER_TRITON_TMA=1): tensor descriptors, warp-specialized
    Case("attn-fwd-bf16-d128-causal-tma", "attention_fwd",
         dict(dtype=BF16, d=128, causal=True, tma=True), configs="extremes"),
    Case("attn-fwd-fp16-d80-boolmask-dropout-tma-fixed-tile", "attention_fwd",
         dict(dtype=FP16, d=80, mask="bool", dropout_p=0.1, tma=True, autotune=False)),
    Case("attn-fwd-fp32-d64-floatmask-causal-tma", "attention_fwd",
         dict(dtype=FP32, d=64, mask="float", causal=True, tma=True)),
    Case("attn-bwd-bf16-d128-causal", "attention_bwd", dict(dtype=BF16, d=128, causal=True),
         configs="extremes", archs=(90, 80)),
    Case("attn-bwd-fp16-d80-boolmask-dropout", "attention_bwd",
         dict(dtype=FP16, d=80, mask="bool", dropout_p=0.1)),
    Case("attn-bwd-fp32-d64-floatmask-causal", "attention_bwd",
         dict(dtype=FP32, d=64, mask="float", causal=True)),
    Case("attn-dropout-mask", "attention_dropout_mask", {}),
    # softmax: rows path at its largest (4 x 1024) and smallest (64 x 8) tile, looped path
    Case("softmax-fwd-bf16-lk1024-boolmask-causal", "softmax_fwd",
         dict(dtype=BF16, lk=1024, mask="bool", causal=True)),
    Case("softmax-fwd-fp32-lk7-floatmask", "softmax_fwd", dict(dtype=FP32, lk=7, mask="float")),
    Case("softmax-fwd-fp16-lk3000-looped-boolmask-causal", "softmax_fwd",
         dict(dtype=FP16, lk=3000, mask="bool", causal=True)),
    Case("softmax-bwd-bf16-lk1024", "softmax_bwd", dict(dtype=BF16, lk=1024)),
    Case("softmax-bwd-fp16-lk7", "softmax_bwd", dict(dtype=FP16, lk=7)),
    Case("softmax-bwd-fp32-lk3000-looped", "softmax_bwd", dict(dtype=FP32, lk=3000)),
    # layer_norm: rows path at its largest (1 x 4096) and smallest (64 x 8) tile, wide path;
    # backward includes the dweight / dbias reduction kernel
    Case("ln-fwd-bf16-n4096-residual-affine", "layer_norm_fwd",
         dict(dtype=BF16, n=4096, residual=True, affine=True)),
    Case("ln-fwd-fp32-n7", "layer_norm_fwd", dict(dtype=FP32, n=7)),
    Case("ln-fwd-fp16-n8192-wide-residual-affine", "layer_norm_fwd",
         dict(dtype=FP16, n=8192, residual=True, affine=True)),
    Case("ln-bwd-bf16-n4096-dh-affine", "layer_norm_bwd",
         dict(dtype=BF16, n=4096, dh=True, affine=True)),
    Case("ln-bwd-fp32-n7-bias", "layer_norm_bwd", dict(dtype=FP32, n=7, bias_only=True)),
    Case("ln-bwd-fp16-n8192-wide-affine", "layer_norm_bwd", dict(dtype=FP16, n=8192, affine=True)),
    # ffn: the GEMM kernel (autotuned) with each epilogue and activation. Forward: act + b1
    # (two accumulators for swiglu), then + b2; backward: act' with hidden recomputed, then
    # + row sums (db2, db1), then plain (dx). fp32 is IEEE (FMA, no tensor cores).
    Case("ffn-fwd-bf16-gelu", "ffn_fwd", dict(dtype=BF16, activation="gelu"),
         configs="extremes"),
    Case("ffn-fwd-bf16-relu", "ffn_fwd", dict(dtype=BF16, activation="relu")),
    Case("ffn-fwd-bf16-gelu_tanh", "ffn_fwd", dict(dtype=BF16, activation="gelu_tanh")),
    Case("ffn-fwd-fp16-swiglu-dropout", "ffn_fwd",
         dict(dtype=FP16, activation="swiglu", dropout_p=0.1)),
    Case("ffn-fwd-fp32-relu", "ffn_fwd", dict(dtype=FP32, activation="relu")),
    Case("ffn-fwd-fp32-gelu-tf32", "ffn_fwd", dict(dtype=FP32, activation="gelu", tf32=True)),
    Case("ffn-bwd-bf16-gelu_tanh-dropout", "ffn_bwd",
         dict(dtype=BF16, activation="gelu_tanh", dropout_p=0.1)),
    Case("ffn-bwd-bf16-relu", "ffn_bwd", dict(dtype=BF16, activation="relu")),
    Case("ffn-bwd-bf16-gelu", "ffn_bwd", dict(dtype=BF16, activation="gelu")),
    Case("ffn-bwd-fp16-swiglu", "ffn_bwd", dict(dtype=FP16, activation="swiglu")),
    Case("ffn-dropout-mask", "ffn_dropout_mask", {}),
    # FUSEDFORMER_AUTOTUNE=0 (make gpu-check's tests): the FFN's one fixed GPU tile
    Case("ffn-fwd-bf16-swiglu-fixed-tile", "ffn_fwd",
         dict(dtype=BF16, activation="swiglu", autotune=False)),
    Case("ffn-bwd-fp16-gelu-dropout-fixed-tile", "ffn_bwd",
         dict(dtype=FP16, activation="gelu", dropout_p=0.1, autotune=False)),
    Case("ffn-bwd-fp32-swiglu-fixed-tile", "ffn_bwd",
         dict(dtype=FP32, activation="swiglu", autotune=False)),
    # the sweep (FUSEDFORMER_AOT_SWEEP=1): every autotune config, D = 256 (fp32 included),
    # sm_80 throughout
    Case("sweep-attn-fwd-bf16-d128-causal", "attention_fwd", dict(dtype=BF16, d=128, causal=True),
         configs="all", archs=(90, 80), slow=True),
    Case("sweep-attn-fwd-fp16-d256-floatmask-dropout", "attention_fwd",
         dict(dtype=FP16, d=256, mask="float", dropout_p=0.1), configs="all", archs=(90, 80),
         slow=True),
    Case("sweep-attn-fwd-fp32-d256-boolmask", "attention_fwd",
         dict(dtype=FP32, d=256, mask="bool"), archs=(90, 80), slow=True),
    Case("sweep-attn-bwd-fp16-d128-boolmask-dropout", "attention_bwd",
         dict(dtype=FP16, d=128, mask="bool", dropout_p=0.1), configs="all", archs=(90, 80),
         slow=True),
    Case("sweep-attn-bwd-bf16-d256-causal", "attention_bwd", dict(dtype=BF16, d=256, causal=True),
         archs=(90, 80), slow=True),
    Case("sweep-attn-bwd-fp32-d256-boolmask-dropout", "attention_bwd",
         dict(dtype=FP32, d=256, mask="bool", dropout_p=0.1), archs=(90, 80), slow=True),
    Case("sweep-ffn-fwd-bf16-swiglu", "ffn_fwd", dict(dtype=BF16, activation="swiglu"),
         configs="all", archs=(90, 80), slow=True),
    Case("sweep-ffn-bwd-fp16-gelu-dropout", "ffn_bwd",
         dict(dtype=FP16, activation="gelu", dropout_p=0.1), configs="all", archs=(90, 80),
         slow=True),
    Case("sweep-ffn-bwd-fp32-swiglu", "ffn_bwd", dict(dtype=FP32, activation="swiglu"),
         configs="all", archs=(90, 80), slow=True),
]
CASES_BY_ID = {c.id: c for c in CASES}
assert len(CASES_BY_ID) == len(CASES)


# ----------------------------------------------------------------------------------------
# Worker side: record the launches, specialize, compile.


def _kernel_modules():
    """kernels/{attention,ffn,layer_norm,softmax}.py (fusedformer.kernels' attributes of those
    names are the autograd ops, hence import_module)."""
    return [importlib.import_module(f"fusedformer.kernels.{op}")
            for op in ("attention", "ffn", "layer_norm", "softmax")]


SEED = 2**61 + 12345  # kernels/ops.py draws seeds in [0, 2^62): an i64 argument, not i32


def _seed(args: dict) -> int:
    """The seed ops.py passes: a fresh 62-bit one with dropout, 0 without."""
    return SEED if args.get("dropout_p", 0.0) > 0 else 0


def _launch_case(case: Case) -> None:
    """Call the case's launcher on small CPU tensors (shapes in multiples of 16 unless a case
    says otherwise, as in training, so the divisibility hints are those of a real run);
    autotune=False runs it under FUSEDFORMER_AUTOTUNE=0, tma=True under FUSEDFORMER_TRITON_TMA=1."""
    env = {"FUSEDFORMER_AUTOTUNE": "0" if case.args.get("autotune") is False else None,
           "FUSEDFORMER_TRITON_TMA": "1" if case.args.get("tma") else None}
    saved = {name: os.environ.get(name) for name in env}
    for name, value in env.items():
        if value is not None:
            os.environ[name] = value
    try:
        _call_launcher(case)
    finally:
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


def _call_launcher(case: Case) -> None:
    attention, ffn, layer_norm, softmax = _kernel_modules()
    a = case.args
    dtype = a.get("dtype")
    if case.launch in ("attention_fwd", "attention_bwd"):
        b, hq, hkv, length, d = 2, 4, 2, a.get("length", 128), a["d"]  # GQA: 2 heads per kv head
        lq = a.get("lq", length)
        q = torch.empty(b, hq, lq, d, dtype=dtype)
        k, v = (torch.empty(b, hkv, length, d, dtype=dtype) for _ in range(2))
        mask = {None: None, "bool": torch.ones(b, 1, 1, length, dtype=torch.bool),
                "float": torch.zeros(1, 1, lq, length, dtype=dtype)}[a.get("mask")]
        common = dict(mask=mask, scale=d ** -0.5, is_causal=a.get("causal", False),
                      dropout_p=a.get("dropout_p", 0.0), seed=_seed(a))
        if case.launch == "attention_fwd":
            attention.attention_fwd(q, k, v, **common, num_splits=a.get("splits", 0))
        else:
            o, do = torch.empty_like(q), torch.empty_like(q)
            lse = torch.empty(b, hq, length, dtype=torch.float32)
            attention.attention_bwd(do, q, k, v, o, lse, **common)
    elif case.launch == "attention_dropout_mask":
        attention.attention_dropout_mask(SEED, (2, 4, 128, 128), 0.1, "cpu")
    elif case.launch in ("softmax_fwd", "softmax_bwd"):
        b, h, lq, lk = 2, 4, 32, a["lk"]
        x = torch.empty(b, h, lq, lk, dtype=dtype)
        if case.launch == "softmax_fwd":
            mask = {None: None, "bool": torch.ones(b, 1, 1, lk, dtype=torch.bool),
                    "float": torch.zeros(1, 1, lq, lk, dtype=dtype)}[a.get("mask")]
            softmax.softmax_fwd(x, mask, 0.125, a.get("causal", False))
        else:
            softmax.softmax_bwd(torch.empty_like(x), x, 0.125)
    elif case.launch in ("layer_norm_fwd", "layer_norm_bwd"):
        m, n = 64, a["n"]
        x = torch.empty(m, n, dtype=dtype)
        weight = torch.empty(n, dtype=dtype) if a.get("affine") else None
        if case.launch == "layer_norm_fwd":
            residual = torch.empty_like(x) if a.get("residual") else None
            layer_norm.layer_norm_fwd(x, residual, weight, weight, 1e-5)
        else:
            stats = torch.empty(m, dtype=torch.float32)
            dh = torch.empty_like(x) if a.get("dh") else None
            need_dbias = a.get("affine", False) or a.get("bias_only", False)
            layer_norm.layer_norm_bwd(torch.empty_like(x), dh, x, weight, stats, stats,
                                      weight is not None, need_dbias)
    elif case.launch in ("ffn_fwd", "ffn_bwd"):
        torch.backends.cuda.matmul.allow_tf32 = a.get("tf32", False)  # fp32: "tf32" or "ieee"
        m, c, f = 256, 128, 512
        f1 = 2 * f if a["activation"] == "swiglu" else f
        x = torch.empty(m, c, dtype=dtype)
        w1, b1 = torch.empty(f1, c, dtype=dtype), torch.empty(f1, dtype=dtype)
        w2, b2 = torch.empty(c, f, dtype=dtype), torch.empty(c, dtype=dtype)
        common = dict(activation=a["activation"], dropout_p=a.get("dropout_p", 0.0),
                      seed=_seed(a))
        if case.launch == "ffn_fwd":
            ffn.ffn_fwd(x, w1, b1, w2, b2, **common)
        else:
            pre = torch.empty(m, f1, dtype=dtype)
            ffn.ffn_bwd(torch.empty_like(x), x, w1, b1, w2, b2, pre, **common)
    elif case.launch == "ffn_dropout_mask":
        ffn.ffn_dropout_mask(SEED, (256, 512), 0.1, "cpu")
    else:
        raise ValueError(f"unknown launcher {case.launch}")


def _record_launches(case: Case) -> list[tuple]:
    """[(kernel, args, kwargs)] of every kernel launch the case's launcher makes; kernel is
    the JITFunction or the triton.autotune wrapper that the launcher indexes."""
    from triton.runtime.autotuner import Autotuner
    from triton.runtime.jit import JITFunction

    modules = _kernel_modules()
    attention = modules[0]
    attention._fwd_kernel_autotuned()  # built lazily; build it so that it gets a recorder
    launches = []

    def recorder(kernel):
        def run(*args, grid, warmup, **kwargs):  # what kernel[grid](*args, **kwargs) calls
            launches.append((kernel, args, kwargs))
        return run

    patched = []
    for module in modules:
        for kernel in vars(module).values():
            # "run" in vars: already patched (a helper imported into a second module)
            if isinstance(kernel, (JITFunction, Autotuner)) and "run" not in vars(kernel):
                kernel.run = recorder(kernel)
                patched.append(kernel)
    check_inputs = attention._check_inputs
    # The only device check in the way: CPU tensors are refused outside the interpreter.
    attention._check_inputs = lambda *args: None
    try:
        _launch_case(case)
    finally:
        attention._check_inputs = check_inputs
        for kernel in patched:
            del kernel.run
    return launches


def _configs(kernel, args: tuple, kwargs: dict, which: str) -> list[tuple]:
    """[(jit function, kwargs with the config's meta-parameters, autotuned, pre_hook)] for one
    recorded launch; `which` as Case.configs. pre_hook: the config's, which the autotuner runs
    before each launch (it sets the attention forward's TMA block shapes), or None."""
    from triton.runtime.autotuner import Autotuner

    if not isinstance(kernel, Autotuner):
        return [(kernel, kwargs, False, None)]
    kernel.nargs = dict(zip(kernel.arg_names, args))  # what Autotuner.run sets before pruning
    configs = sorted(kernel.prune_configs(kwargs),
                     key=lambda c: (_tile_size(c.kwargs), c.num_warps, c.num_stages))
    if which == "smallest":
        configs = configs[:1]
    elif which == "extremes" and len(configs) > 2:
        configs = [configs[0], configs[-1]]
    return [(kernel.fn, {**kwargs, **c.all_kwargs()}, True, c.pre_hook) for c in configs]


def _tile_size(meta: dict) -> int:
    """Product of the BLOCK_* meta-parameters: the tile size, roughly the compile time."""
    return math.prod(v for k, v in meta.items() if k.startswith("BLOCK"))


def _specialize(fn, args: tuple, kwargs: dict) -> tuple[dict, dict, dict, dict]:
    """(signature, constexprs, attrs, options) as Triton's launcher derives them."""
    from triton.backends.nvidia.compiler import CUDABackend
    from triton.runtime.jit import native_specialize_impl

    bound = inspect.signature(fn.fn).bind(*args, **{k: v for k, v in kwargs.items()
                                                    if k in fn.arg_names})
    options = {k: v for k, v in kwargs.items() if k not in fn.arg_names}
    signature, constexprs, attrs = {}, {}, {}
    for i, (param, name) in enumerate(zip(fn.params, fn.arg_names)):
        value = bound.arguments[name]
        if param.is_constexpr:
            signature[name], constexprs[name] = "constexpr", value
            continue
        ty, key = native_specialize_impl(CUDABackend, value, False, True, True)
        signature[name] = ty
        if ty == "constexpr":  # an int equal to 1, or None
            constexprs[name] = value
        elif key:
            attrs[(i,)] = CUDABackend.parse_attr(key)
    return signature, constexprs, attrs, options


def _jobs(case_ids: list[str]) -> list[dict]:
    """The unique compiles of the cases (a compile that several cases share runs once),
    biggest tiles (the slowest compiles) first."""
    jobs = {}
    for case_id in case_ids:
        case = CASES_BY_ID[case_id]
        for kernel, args, kwargs in _record_launches(case):
            for fn, kw, autotuned, pre_hook in _configs(kernel, args, kwargs, case.configs):
                if pre_hook is not None:
                    pre_hook({**dict(zip(fn.arg_names, args)), **kw})
                signature, constexprs, attrs, options = _specialize(fn, args, kw)
                for arch in case.archs:
                    key = repr((fn.__name__, signature, constexprs, attrs, options, arch))
                    config = " ".join(f"{k}={v}" for k, v in kw.items()
                                      if k.startswith("BLOCK") or k in ("num_warps", "num_stages"))
                    job = jobs.setdefault(key, dict(
                        fn=fn, signature=signature, constexprs=constexprs, attrs=attrs,
                        options=options, arch=arch, config=config, autotuned=autotuned,
                        tile=_tile_size(kw), cases=[]))
                    if case_id not in job["cases"]:
                        job["cases"].append(case_id)
    return sorted(jobs.values(), key=lambda job: -job["tile"])


def _ptxas_usage(log: str) -> dict:
    """Registers, stack frame and spill bytes from ptxas -v (Triton runs ptxas with -v and
    prints its log under TRITON_DUMP_PTXAS_LOG=1)."""
    regs = re.search(r"Used (\d+) registers", log)
    frame = re.search(r"(\d+) bytes stack frame, (\d+) bytes spill stores, "
                      r"(\d+) bytes spill loads", log)
    return dict(regs=int(regs.group(1)) if regs else -1,
                **dict(zip(("stack", "spill_stores", "spill_loads"),
                           map(int, frame.groups()) if frame else (-1, -1, -1))))


def _compile(job: dict) -> dict:
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    result = dict(module=job["fn"].fn.__module__.rsplit(".", 1)[-1], kernel=job["fn"].__name__,
                  config=job["config"], arch=job["arch"],
                  autotuned=job["autotuned"], cases=job["cases"],
                  dtypes=sorted({"*" + t[len("tensordesc<"):].split("[")[0]
                                 if t.startswith("tensordesc<") else t
                                 for t in job["signature"].values()
                                 if t.startswith(("*", "tensordesc<"))}),
                  interpreter_flags=[k for k in INTERPRETER_FLAGS if job["constexprs"].get(k)])
    start = time.perf_counter()
    log = io.StringIO()
    try:
        src = ASTSource(fn=job["fn"], signature=job["signature"], constexprs=job["constexprs"],
                        attrs=job["attrs"])
        with contextlib.redirect_stdout(log):
            compiled = triton.compile(src, target=GPUTarget("cuda", job["arch"], 32),
                                      options=job["options"])
    except Exception as e:  # noqa: BLE001  a compile error is what the test reports
        return dict(result, ok=False, seconds=time.perf_counter() - start,
                    error=f"{type(e).__name__}: {e}"[-6000:])
    ptx, cubin = compiled.asm.get("ptx", ""), compiled.asm.get("cubin", b"")
    return dict(result, ok=True, seconds=time.perf_counter() - start, ptx_bytes=len(ptx),
                cubin_bytes=len(cubin), wgmma="wgmma" in ptx,
                mma=re.search(r"\bmma\.sync", ptx) is not None, shared=compiled.metadata.shared,
                **_ptxas_usage(log.getvalue()))


def _worker(claims: pathlib.Path, out: pathlib.Path, case_ids: list[str]) -> None:
    """Compile every job that no other worker has claimed first (a claim is a file created
    with O_EXCL); write the results to `out` as JSON."""
    results = []
    for i, job in enumerate(_jobs(case_ids)):
        try:
            os.close(os.open(claims / str(i), os.O_CREAT | os.O_EXCL))
        except FileExistsError:
            continue
        results.append(_compile(job))
    out.write_text(json.dumps(results))


# ----------------------------------------------------------------------------------------
# Test side


def _nvidia_backend_missing() -> str:
    """Why the NVIDIA backend cannot compile here, or '' when it can."""
    try:
        import triton
        from triton.backends import backends
    except ImportError as e:
        return f"triton not importable: {e}"
    if "nvidia" not in backends:
        return "triton has no NVIDIA backend"
    try:
        ptxas = triton.knobs.nvidia.ptxas.path
    except Exception as e:  # noqa: BLE001  the knob raises when it finds no ptxas
        return f"ptxas not found: {e}"
    return "" if os.access(ptxas, os.X_OK) else f"ptxas not executable: {ptxas}"


NO_BACKEND = _nvidia_backend_missing()


@pytest.fixture(scope="module")
def compiled(request, tmp_path_factory) -> dict[str, list[dict]]:
    """{case id: [compile results]} of the selected cases, from one worker per core."""
    selected = sorted({item.callspec.params["case"].id for item in request.session.items
                       if item.module is request.module and hasattr(item, "callspec")
                       and (SWEEP or not item.callspec.params["case"].slow)})
    out_dir = tmp_path_factory.mktemp("triton_aot")
    (out_dir / "claims").mkdir()
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.update(TRITON_CACHE_DIR=str(out_dir / "cache"), TRITON_DUMP_PTXAS_LOG="1")
    procs = []
    for i in range(os.cpu_count() or 2):
        with open(out_dir / f"{i}.log", "w") as log:
            procs.append(subprocess.Popen([sys.executable, __file__, str(out_dir / "claims"),
                                           str(out_dir / f"{i}.json"), *selected],
                                          env=env, stdout=log, stderr=subprocess.STDOUT))
    deadline = time.monotonic() + WORKER_TIMEOUT_S
    by_case: dict[str, list[dict]] = {case_id: [] for case_id in selected}
    for i, proc in enumerate(procs):
        try:
            proc.wait(timeout=max(1.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            for p in procs:
                p.kill()
            pytest.fail(f"the compile workers did not finish in {WORKER_TIMEOUT_S} s")
        log = (out_dir / f"{i}.log").read_text()
        assert proc.returncode == 0, f"compile worker {i} failed:\n{log[-8000:]}"
        for result in json.loads((out_dir / f"{i}.json").read_text()):
            for case_id in result["cases"]:
                by_case[case_id].append(result)
    return by_case


@pytest.mark.skipif(bool(NO_BACKEND), reason=NO_BACKEND)
@pytest.mark.parametrize("case", [pytest.param(c, id=c.id, marks=[
    pytest.mark.slow, pytest.mark.skipif(not SWEEP, reason="runs with FUSEDFORMER_AOT_SWEEP=1")]
    if c.slow else []) for c in CASES])
def test_triton_kernel_compiles(case, compiled):
    results = sorted(compiled[case.id], key=lambda r: (r["kernel"], -r["arch"], r["config"]))
    assert results, f"{case.id}: the launcher launched no kernel"
    interpreted = [f"{r['kernel']}: {r['interpreter_flags']}" for r in results
                   if r["interpreter_flags"]]
    assert not interpreted, f"compiled with the interpreter's workarounds on: {interpreted}"
    failed = [f"{r['kernel']} [{r['config']}] sm_{r['arch']}:\n{r['error']}"
              for r in results if not r["ok"]]
    assert not failed, "\n\n".join(failed)
    for r in results:
        where = f"{r['kernel']} [{r['config']}] sm_{r['arch']}"
        limit = SM90_SHARED if r["arch"] == 90 else SM80_SHARED
        too_big = r["shared"] > limit
        print(f"{where}: {r['regs']} regs, {r['spill_stores']} B spill stores, {r['stack']} B "
              f"stack, {r['shared']} B shared{' (over the limit)' if too_big else ''}, "
              f"{'wgmma' if r['wgmma'] else 'mma' if r['mma'] else 'no mma'}, {r['seconds']:.1f} s")
        assert r["ptx_bytes"] > 0 and r["cubin_bytes"] > 0, f"{where}: no PTX / cubin"
        # An autotuned config over the limit is benchmarked as inf (OutOfResources) and
        # skipped by the autotuner; a fixed config over it would fail every launch.
        assert r["autotuned"] or not too_big, f"{where}: {r['shared']} B of shared memory > {limit}"
        if {"*bf16", "*fp16"} & set(r["dtypes"]) and r["kernel"] in TENSOR_CORE_KERNELS:
            assert r["mma"] or r["wgmma"], f"{where}: no tensor-core instruction in the PTX"


@pytest.mark.skipif(bool(NO_BACKEND), reason=NO_BACKEND)
def test_every_kernel_is_compiled(compiled):
    """Every *_kernel of kernels/*.py is compiled by some default case: a new kernel (or a
    launcher path that no case reaches) needs a case above."""
    if any(c.id not in compiled for c in CASES if not c.slow):
        pytest.skip("needs every default case selected")
    kernels = {(module.__name__.rsplit(".", 1)[-1], name) for module in _kernel_modules()
               for name in vars(module) if name.endswith("_kernel")}
    done = {(r["module"], r["kernel"]) for results in compiled.values() for r in results}
    assert kernels <= done, f"compiled by no case: {sorted(kernels - done)}"


if __name__ == "__main__":
    _worker(pathlib.Path(sys.argv[1]), pathlib.Path(sys.argv[2]), sys.argv[3:])
