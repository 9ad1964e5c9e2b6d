"""Summarize a pytest-benchmark JSON (bench/results/*.json) as a table; "vs peer" is the
speed ratio against torch eager (or SDPA-flash / SDPA for attention) from the same run.

    python bench/report.py bench/results/cpu-latest.json
"""
from __future__ import annotations

import json
import sys
from collections import defaultdict


def main(path: str) -> None:
    data = json.load(open(path))
    info = data.get("machine_info", {})
    print(f"# {path}: {info.get('device', '?')}, torch {info.get('torch')}, triton {info.get('triton')}, "
          f"git {info.get('git')}, {data.get('datetime', '')}")
    if "cpu_isa" in info or "malloc" in info:
        print(f"# threads {info.get('threads')}; {info.get('cpu_isa', '?')}; malloc: {info.get('malloc', '?')}")
    groups = defaultdict(dict)
    for bench in data["benchmarks"]:
        extra = bench["extra_info"]
        variant = ",".join(f"{k}={extra[k]}" for k in ("activation", "causal") if k in extra)
        key = (bench["name"].split("[")[0] + (f"[{variant}]" if variant else ""), extra.get("mode"),
               extra.get("dtype"), str(extra.get("shape")))
        median = extra.get("median_s", bench["stats"]["median"])
        groups[key][extra["provider"]] = (median, extra.get("GB/s"), extra.get("TFLOP/s"))
    print(f"{'benchmark':<28} {'mode':<8} {'dtype':<15} {'shape':<18} {'provider':<18} "
          f"{'median ms':>10} {'GB/s':>8} {'TFLOP/s':>8} {'vs peer':>9}")
    for key in sorted(groups):
        rows = groups[key]
        base = (rows.get("torch") or rows.get("sdpa-flash") or rows.get("sdpa") or (None,))[0]
        for provider, (median, gbs, tflops) in sorted(rows.items()):
            ratio = f"{base / median:.2f}x" if base else "-"
            print(f"{key[0]:<28} {key[1] or '-':<8} {key[2] or '-':<15} {key[3]:<18} {provider:<18} "
                  f"{median * 1e3:>10.3f} {gbs or 0:>8.1f} {tflops or 0:>8.2f} {ratio:>9}")


if __name__ == "__main__":
    main(sys.argv[1])
