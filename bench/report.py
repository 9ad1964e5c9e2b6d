"""Summarize a benchmark run as a table: pytest-benchmark's JSON (bench/results/*.json) or the
rows streamed by FUSEDFORMER_BENCH_JSONL (bench/gpu_run.py's bench.jsonl).

    python bench/report.py bench/results/cpu-latest.json

Rows "<provider> (fixed)" are Triton kernels timed with FUSEDFORMER_AUTOTUNE=0 (one fixed tile
per kernel). Columns: "vs peer" is the speed ratio against torch eager (or SDPA-flash / SDPA for
attention) from the same run; "% ceil" is the row's TFLOP/s over the matmul ceiling, or its GB/s
over the copy ceiling, both measured in the same run by bench/bench_ceilings.py (blank when the
run has no ceilings). Over 100% means the working set stayed in cache: the copy ceiling is a
copy far larger than the caches.
"""
from __future__ import annotations

import json
import sys
from collections import defaultdict


def load(path: str) -> dict:
    """{"machine_info", "datetime", "benchmarks": [{"name", "extra_info"}]} from either format."""
    if not path.endswith(".jsonl"):
        return json.load(open(path))
    rows = [json.loads(line) for line in open(path) if line.strip()]
    return {"machine_info": rows[0]["machine_info"] if rows else {}, "datetime": "streamed rows",
            "benchmarks": rows}


def ceilings(benchmarks: list[dict]) -> dict[str, float]:
    """{"copy": GB/s, "matmul": TFLOP/s} from bench_ceilings.py's rows (the best if repeated)."""
    found: dict[str, float] = {}
    for bench in benchmarks:
        extra = bench["extra_info"]
        kind = extra.get("ceiling")
        rate = extra.get("GB/s") if kind == "copy" else extra.get("TFLOP/s") if kind == "matmul" else None
        if rate:
            found[kind] = max(found.get(kind, 0.0), rate)
    return found


def main(path: str) -> None:
    data = load(path)
    info = data.get("machine_info", {})
    print(f"# {path}: {info.get('device', '?')}, torch {info.get('torch')}, triton {info.get('triton')}, "
          f"git {info.get('git')}, {data.get('datetime', '')}")
    if "cpu_isa" in info or "malloc" in info:
        print(f"# threads {info.get('threads')}; {info.get('cpu_isa', '?')}; malloc: {info.get('malloc', '?')}")
    ceil = ceilings(data["benchmarks"])
    if ceil:
        print("# ceilings: " + ", ".join(f"{k} {v:.3g} {'GB/s' if k == 'copy' else 'TFLOP/s'}"
                                         for k, v in sorted(ceil.items())))
    groups = defaultdict(dict)
    for bench in data["benchmarks"]:
        extra = bench["extra_info"]
        variant = ",".join(f"{k}={extra[k]}" for k in ("activation", "causal") if k in extra)
        key = (bench["name"].split("[")[0] + (f"[{variant}]" if variant else ""), extra.get("mode"),
               extra.get("dtype"), str(extra.get("shape")))
        median = extra.get("median_s", bench.get("stats", {}).get("median"))
        # A GPU run times the Triton kernels twice: with their fixed tiles and autotuned.
        provider = extra["provider"] + (" (fixed)" if extra.get("autotune") == "off" else "")
        groups[key][provider] = (median, extra.get("GB/s"), extra.get("TFLOP/s"))
    print(f"{'benchmark':<28} {'mode':<8} {'dtype':<15} {'shape':<18} {'provider':<22} "
          f"{'median ms':>10} {'GB/s':>8} {'TFLOP/s':>8} {'% ceil':>7} {'vs peer':>9}")
    for key in sorted(groups):
        rows = groups[key]
        base = (rows.get("torch") or rows.get("sdpa-flash") or rows.get("sdpa") or (None,))[0]
        for provider, (median, gbs, tflops) in sorted(rows.items()):
            ratio = f"{base / median:.2f}x" if base else "-"
            share = (tflops / ceil["matmul"] if tflops and "matmul" in ceil
                     else gbs / ceil["copy"] if gbs and "copy" in ceil else None)
            print(f"{key[0]:<28} {key[1] or '-':<8} {key[2] or '-':<15} {key[3]:<18} {provider:<22} "
                  f"{median * 1e3:>10.3f} {gbs or 0:>8.1f} {tflops or 0:>8.2f} "
                  f"{f'{share:.0%}' if share is not None else '':>7} {ratio:>9}")


if __name__ == "__main__":
    main(sys.argv[1])
