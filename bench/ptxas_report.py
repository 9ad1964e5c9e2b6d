"""Registers, spills and static shared memory of every CUDA kernel, as ptxas reports them for
the release build's flags (-O3), without a GPU: the resource side of the napkin math, and a
baseline that a kernel change can be compared against before any GPU time is spent.

    python bench/ptxas_report.py [--arch 90a] [--out bench/results/ptxas-sm_90a.txt]

Registers bound occupancy (65536 per SM, allocated per warp in units of 256): a 128-thread
block at 168 registers or fewer fits 3 per SM, at 255 only 2. Spill stores go to local memory
(L1-cached) and are the first thing to look at when a kernel is slower than its FLOPs say.
"loop spills": for a kernel that spills, the local-memory loads and stores (LDL/STL in its
SASS, by cuobjdump) inside its longest loop (the largest backward branch: the key or query
loop of an attention kernel, the k loop of a GEMM), which run every iteration; the others run
once a block, in the prologue or epilogue. "-": no spills, or no cuobjdump.
"wg sync": warpgroup.arrive / warpgroup.wait that ptxas injected into a wgmma kernel (its
warnings C7519 / C7517) because a register of a wgmma batch is touched between its
instructions; each serializes the asynchronous MMA, so a wgmma kernel should show 0.
"""
from __future__ import annotations

import argparse
import pathlib
import re
import shutil
import subprocess
import sys
import tempfile

ROOT = pathlib.Path(__file__).resolve().parents[1]


def _demangle(names: list[str]) -> list[str]:
    out = subprocess.run(["c++filt"], input="\n".join(names), capture_output=True, text=True).stdout.splitlines()
    clean = []
    for name in out:
        name = re.sub(r"fusedformer::\(anonymous namespace\)::", "", name)
        name = re.sub(r"(?<=>)\(.*\)$", "", name)  # the argument list after the template arguments
        clean.append(name.replace("__nv_bfloat16", "bf16").replace("__half", "fp16"))
    return clean


def cuobjdump() -> str | None:
    """The CUDA toolkit's cuobjdump, else the one the triton wheel ships, else None."""
    found = shutil.which("cuobjdump")
    if found:
        return found
    try:
        import triton
    except ImportError:
        return None
    bundled = pathlib.Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"
    return str(bundled) if bundled.exists() else None


def loop_spills(obj: pathlib.Path, kernel: str, tool: str) -> int:
    """LDL/STL instructions of `kernel` (mangled) inside its longest loop."""
    sass = subprocess.run([tool, "--dump-sass", "--function", kernel, str(obj)],
                          capture_output=True, text=True, check=True).stdout
    return count_loop_spills(sass)


def count_loop_spills(sass: str) -> int:
    """LDL/STL instructions of one function's SASS (cuobjdump --dump-sass) inside its longest
    loop: the span of its largest backward branch."""
    code = [(int(m.group(1), 16), m.group(2)) for m in re.finditer(r"/\*([0-9a-f]{4,})\*/\s+([^;]*);", sass)]
    back = [(int(m.group(1), 16), address) for address, text in code
            if (m := re.match(r"(?:@!?U?P\w+\s+)?BRA\s+0x([0-9a-f]+)", text)) and int(m.group(1), 16) < address]
    if not back:
        return 0
    start, end = max(back, key=lambda span: span[1] - span[0])
    return sum(1 for address, text in code
               if start <= address <= end and re.match(r"(?:@!?U?P\w+\s+)?(LDL|STL)\b", text))


def nvcc_command(nvcc: str, cu: pathlib.Path, obj: pathlib.Path, arch: str, *flags: str) -> list[str]:
    """nvcc compiling one csrc/cuda file to obj for sm_{arch} as setup.py's CUDA build does
    (C++17, csrc/ on the include path), plus flags (optimization levels, -Xptxas -v). Also
    test_nvcc.py's compile check."""
    return [nvcc, "-c", str(cu), "-o", str(obj), "-std=c++17", *flags, f"-I{ROOT / 'csrc'}",
            "--expt-relaxed-constexpr", "-DFUSEDFORMER_WITH_CUDA=1", f"-gencode=arch=compute_{arch},code=sm_{arch}"]


def report(cu: pathlib.Path, arch: str, nvcc: str) -> list[tuple[str, int, int, int, int, int | None, int]]:
    """(kernel, registers, spill stores, spill loads, static smem bytes, loop spills (None: not
    counted), injected warpgroup syncs) per entry function."""
    tool = cuobjdump()
    with tempfile.TemporaryDirectory() as tmp:
        obj = pathlib.Path(tmp) / "k.o"
        cmd = nvcc_command(nvcc, cu, obj, arch, "-O3", "-Xptxas", "-v")
        proc = subprocess.run(cmd, capture_output=True, text=True)
        if proc.returncode != 0:
            sys.exit(f"{' '.join(cmd)}\n{proc.stderr[-4000:]}")
        rows, in_loop = _parse_ptxas(proc.stderr), {}
        for kernel, (_, st, ld, _, _) in rows.items():
            if tool and (st or ld):
                in_loop[kernel] = loop_spills(obj, kernel, tool)
    names = _demangle(list(rows))
    return sorted((n, r[0], r[1], r[2], r[3], in_loop.get(k), r[4]) for n, (k, r) in zip(names, rows.items()))


def _parse_ptxas(log: str) -> dict[str, tuple[int, int, int, int, int]]:
    """Mangled kernel -> (registers, spill stores, spill loads, static smem, injected syncs)
    from ptxas -v's log."""
    rows, current, injected = {}, None, {}
    for line in log.splitlines():
        if m := re.search(r"warpgroup\.(?:arrive|wait) is injected .* in function '(\S+)'", line):
            injected[m.group(1)] = injected.get(m.group(1), 0) + 1
        elif m := re.search(r"Compiling entry function '(\S+)'", line):
            current = m.group(1)
            rows[current] = [0, None, 0, 0]
        elif current and (m := re.search(r"(\d+) bytes spill stores, (\d+) bytes spill loads", line)):
            if rows[current][1] is None:  # the entry's own line, not a callee's that follows
                rows[current][1:3] = [int(m.group(1)), int(m.group(2))]
        elif current and (m := re.search(r"Used (\d+) registers", line)):
            rows[current][0] = int(m.group(1))
            if s := re.search(r"(\d+) bytes smem", line):
                rows[current][3] = int(s.group(1))
    return {k: (r[0], r[1] or 0, r[2], r[3], injected.get(k, 0)) for k, r in rows.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", default="90a")
    parser.add_argument("--out", type=pathlib.Path)
    args = parser.parse_args()
    nvcc = shutil.which("nvcc")
    if nvcc is None:
        sys.exit("nvcc not found on PATH")
    version = subprocess.run([nvcc, "--version"], capture_output=True, text=True).stdout.strip().splitlines()[-1]
    git = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True).stdout.strip()
    lines = [f"# ptxas -v, sm_{args.arch}, -O3; {version}; git {git}",
             f"{'regs':>5} {'spill st':>9} {'spill ld':>9} {'loop spills':>12} {'static smem':>12} {'wg sync':>8}  kernel"]
    for cu in sorted((ROOT / "csrc" / "cuda").glob("*.cu")):
        lines.append(f"# {cu.relative_to(ROOT)}")
        for name, regs, st, ld, smem, loop, wg in report(cu, args.arch, nvcc):
            loop_text = "-" if loop is None else str(loop)
            lines.append(f"{regs:>5} {st:>9} {ld:>9} {loop_text:>12} {smem:>12} {wg:>8}  {name}")
    text = "\n".join(lines) + "\n"
    print(text, end="")
    if args.out:
        args.out.write_text(text)


if __name__ == "__main__":
    main()
