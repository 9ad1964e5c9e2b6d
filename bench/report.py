"""Summarize a benchmark run as a table: pytest-benchmark's JSON (bench/results/*.json) or the
rows streamed by FUSEDFORMER_BENCH_JSONL (bench/gpu_run.py's bench.jsonl).

    python bench/report.py bench/results/cpu-latest.json

Rows "<provider> (fixed)" are Triton kernels timed with FUSEDFORMER_AUTOTUNE=0 (one fixed tile
per kernel). Columns: "vs peer" is the speed ratio against torch eager (or SDPA-flash / SDPA for
attention) from the same run; "% ceil" is the row's TFLOP/s over the matmul ceiling, or its GB/s
over the copy ceiling, both measured in the same run by bench/bench_ceilings.py (blank when the
run has no ceilings). Over 100% means the working set stayed in cache: the copy ceiling is a
copy far larger than the caches.

    python bench/report.py bench/results/cpu-latest.json --plot bench/results/plots

also writes one SVG bar chart per (benchmark, mode, dtype): a group of bars per shape, one bar
per provider, its height the row's TFLOP/s (GB/s for byte-bound ops), labelled with its ratio
against the peer, and the same run's ceiling as a dashed line. Plain SVG from the standard
library, so it runs on a GPU image without matplotlib and renders on GitHub.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import re
import sys
from collections import defaultdict
from typing import NamedTuple, Optional
from xml.sax.saxutils import escape


def load(path: str) -> dict:
    """{"machine_info", "datetime", "benchmarks": [{"name", "extra_info"}]} from either format."""
    with open(path) as f:
        text = f.read()
    if not text.strip():  # pytest-benchmark leaves the JSON empty when no benchmark ran
        raise SystemExit(f"{path} is empty: no benchmark ran (did -k select none?)")
    if not path.endswith(".jsonl"):
        return json.loads(text)
    rows = [json.loads(line) for line in text.splitlines() if line.strip()]
    return {"machine_info": rows[0]["machine_info"] if rows else {}, "datetime": "streamed rows",
            "benchmarks": rows}


def ceilings(benchmarks: list[dict]) -> dict[str, float]:
    """{"copy": GB/s, "matmul <dtype>": TFLOP/s for each dtype measured} from bench_ceilings.py's
    rows (the best if repeated)."""
    found: dict[str, float] = {}
    for bench in benchmarks:
        extra = bench["extra_info"]
        kind = extra.get("ceiling")
        rate = extra.get("GB/s") if kind == "copy" else extra.get("TFLOP/s") if kind == "matmul" else None
        if rate:
            key = f"matmul {extra.get('dtype')}" if kind == "matmul" else kind
            found[key] = max(found.get(key, 0.0), rate)
    return found


def ceiling_for(ceil: dict[str, float], kind: str, dtype: Optional[str]) -> Optional[float]:
    """The ceiling a row of `dtype` is held to: copy, or the matmul rate of its own dtype (a CPU
    run measures fp32 and bf16); a run with one matmul dtype (the GPU's bf16) holds every row to it."""
    if kind == "copy":
        return ceil.get("copy")
    matmul = {k: v for k, v in ceil.items() if k.startswith("matmul")}
    return matmul.get(f"matmul {dtype}", next(iter(matmul.values())) if len(matmul) == 1 else None)


class Row(NamedTuple):
    median_s: float
    gbs: Optional[float]
    tflops: Optional[float]


Key = tuple[str, Optional[str], Optional[str], str]  # (benchmark[variant], mode, dtype, shape)


def grouped(benchmarks: list[dict]) -> dict[Key, dict[str, Row]]:
    """The rows by what they measure, then by provider: the providers a ratio compares."""
    groups: dict[Key, dict[str, Row]] = defaultdict(dict)
    for bench in benchmarks:
        extra = bench["extra_info"]
        variant = ",".join(f"{k}={extra[k]}" for k in ("activation", "causal") if k in extra)
        key = (bench["name"].split("[")[0] + (f"[{variant}]" if variant else ""), extra.get("mode"),
               extra.get("dtype"), str(extra.get("shape")))
        median = extra.get("median_s", bench.get("stats", {}).get("median"))
        # A GPU run times the Triton kernels twice: with their fixed tiles and autotuned.
        provider = extra["provider"] + (" (fixed)" if extra.get("autotune") == "off" else "")
        groups[key][provider] = Row(median, extra.get("GB/s"), extra.get("TFLOP/s"))
    return groups


def peer_median(rows: dict[str, Row]) -> Optional[float]:
    """The median every row of a group is compared with: torch eager, else SDPA (flash)."""
    for peer in ("torch", "sdpa-flash", "sdpa"):
        if peer in rows:
            return rows[peer].median_s
    return None


def header(path: str, data: dict) -> list[str]:
    info = data.get("machine_info", {})
    lines = [f"# {path}: {info.get('device', '?')}, torch {info.get('torch')}, triton {info.get('triton')}, "
             f"git {info.get('git')}, {data.get('datetime', '')}"]
    if "cpu_isa" in info or "malloc" in info:
        lines.append(f"# {info.get('cpu', '?')}, threads {info.get('threads')}; {info.get('cpu_isa', '?')}; "
                     f"malloc: {info.get('malloc', '?')}")
    return lines


def main(path: str, data: dict | None = None) -> None:
    """Prints the table of the run at path (data: that run, if already loaded)."""
    data = data if data is not None else load(path)
    print("\n".join(header(path, data)))
    ceil = ceilings(data["benchmarks"])
    if ceil:
        print("# ceilings: " + ", ".join(f"{k} {v:.3g} {'GB/s' if k == 'copy' else 'TFLOP/s'}"
                                         for k, v in sorted(ceil.items())))
    groups = grouped(data["benchmarks"])
    print(f"{'benchmark':<28} {'mode':<8} {'dtype':<15} {'shape':<18} {'provider':<22} "
          f"{'median ms':>10} {'GB/s':>8} {'TFLOP/s':>8} {'% ceil':>7} {'vs peer':>9}")
    for key in sorted(groups):
        rows = groups[key]
        base = peer_median(rows)
        for provider, (median, gbs, tflops) in sorted(rows.items()):
            ratio = f"{base / median:.2f}x" if base else "-"
            kind = "matmul" if tflops else "copy" if gbs else None
            limit = ceiling_for(ceil, kind, key[2]) if kind else None
            share = (tflops or gbs) / limit if limit else None
            print(f"{key[0]:<28} {key[1] or '-':<8} {key[2] or '-':<15} {key[3]:<18} {provider:<22} "
                  f"{median * 1e3:>10.3f} {gbs or 0:>8.1f} {tflops or 0:>8.2f} "
                  f"{f'{share:.0%}' if share is not None else '':>7} {ratio:>9}")


# Okabe-Ito: distinguishable with the common colour-vision deficiencies; then greys.
PALETTE = ["#0072B2", "#E69F00", "#009E73", "#CC79A7", "#56B4E9", "#D55E00", "#F0E442", "#000000",
           "#999999", "#666666", "#BBBBBB", "#333333"]


def nice_ticks(top: float) -> list[float]:
    """0 and the multiples of a 1-2-5 step up to at least top, four to eight of them."""
    step = 10 ** math.floor(math.log10(top / 4)) if top > 0 else 1.0
    for mul in (1, 2, 5, 10):
        if top / (step * mul) <= 7:
            step *= mul
            break
    return [step * i for i in range(math.ceil(top / step - 1e-9) + 1)]


def chart(title: str, subtitle: list[str], shapes: dict[str, dict[str, Row]], colours: dict[str, str],
          ceil: dict[str, float], dtype: Optional[str] = None) -> str:
    """One bar chart as SVG text: x groups the shapes, a bar per provider in each; the dashed
    line is the ceiling of the rows' dtype."""
    use_flops = any(row.tflops for rows in shapes.values() for row in rows.values())
    unit, ceiling_name = ("TFLOP/s", "matmul") if use_flops else ("GB/s", "copy")
    limit = ceiling_for(ceil, ceiling_name, dtype)

    def rate(row: Row) -> float:
        return (row.tflops if use_flops else row.gbs) or 0.0

    providers = sorted({p for rows in shapes.values() for p in rows})
    ticks = nice_ticks(max([rate(r) for rows in shapes.values() for r in rows.values()]
                           + [limit or 0.0]) * 1.08)
    top = ticks[-1]
    bar, left, plot_h, head, char_w = 22, 64, 260, 70, 7  # char_w: an 11 px character, roughly
    group_w = max(bar * len(providers) + 24, char_w * max(len(s) for s in shapes) + 16)
    width = max(left + group_w * len(shapes) + 20, 16 + char_w * max(len(line) for line in [title, *subtitle]))
    height = head + plot_h + 40 + 16 * len(providers) + 10
    y_of = lambda v: head + plot_h - v / top * plot_h  # noqa: E731
    out = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" '
           f'font-family="sans-serif" font-size="11">',
           f'<rect width="{width}" height="{height}" fill="white"/>',
           f'<text x="8" y="18" font-size="14" font-weight="bold">{escape(title)}</text>',
           *(f'<text x="8" y="{36 + 14 * i}" fill="#555">{escape(line)}</text>' for i, line in enumerate(subtitle)),
           f'<line x1="{left}" y1="{head + plot_h}" x2="{width - 10}" y2="{head + plot_h}" stroke="black"/>',
           f'<line x1="{left}" y1="{head}" x2="{left}" y2="{head + plot_h}" stroke="black"/>',
           f'<text x="14" y="{head + plot_h / 2}" transform="rotate(-90 14 {head + plot_h / 2})" '
           f'text-anchor="middle">{unit}</text>']
    for v in ticks:
        out.append(f'<text x="{left - 4}" y="{y_of(v) + 4:.1f}" text-anchor="end">{v:.3g}</text>')
        out.append(f'<line x1="{left}" y1="{y_of(v):.1f}" x2="{width - 10}" y2="{y_of(v):.1f}" stroke="#eee"/>')
    if limit:
        y = y_of(limit)
        out.append(f'<line class="ceiling" x1="{left}" y1="{y:.1f}" x2="{width - 10}" y2="{y:.1f}" '
                   f'stroke="#C00" stroke-dasharray="6 4"/>')
        out.append(f'<text x="{width - 12}" y="{y - 4:.1f}" text-anchor="end" fill="#C00">'
                   f'{ceiling_name} ceiling {limit:.3g} {unit}</text>')
    for g, (shape, rows) in enumerate(shapes.items()):
        x0 = left + g * group_w + (group_w - bar * len(providers)) / 2
        base = peer_median(rows)
        for j, provider in enumerate(providers):
            if provider not in rows:
                continue
            row, x = rows[provider], x0 + j * bar
            y = y_of(rate(row))
            out.append(f'<rect class="bar" data-provider="{escape(provider)}" data-shape="{escape(shape)}" '
                       f'x="{x:.1f}" y="{y:.1f}" width="{bar - 2}" height="{head + plot_h - y:.1f}" '
                       f'fill="{colours[provider]}"><title>{escape(provider)} {escape(shape)}: '
                       f'{rate(row):.3g} {unit}, {row.median_s * 1e3:.3f} ms</title></rect>')
            if base:
                out.append(f'<text x="{x + bar / 2 - 1:.1f}" y="{y - 3:.1f}" text-anchor="middle" '
                           f'font-size="8">{base / row.median_s:.2f}x</text>')
        out.append(f'<text x="{left + (g + 0.5) * group_w:.1f}" y="{head + plot_h + 16}" '
                   f'text-anchor="middle">{escape(shape)}</text>')
    for j, provider in enumerate(providers):
        y = head + plot_h + 34 + 16 * j
        out.append(f'<rect x="{left}" y="{y}" width="10" height="10" fill="{colours[provider]}"/>')
        out.append(f'<text x="{left + 16}" y="{y + 9}">{escape(provider)}</text>')
    out.append("</svg>")
    return "\n".join(out) + "\n"


def plot(path: str, out_dir: str, data: dict | None = None) -> list[str]:
    """Writes one SVG per (benchmark, mode, dtype) of the run at path (data: that run, if
    already loaded) under out_dir; returns the paths."""
    data = data if data is not None else load(path)
    ceil = ceilings(data["benchmarks"])
    groups = grouped(data["benchmarks"])
    providers = sorted({p for rows in groups.values() for p in rows})
    colours = {p: PALETTE[i % len(PALETTE)] for i, p in enumerate(providers)}  # one colour per provider in every chart
    charts: dict[tuple, dict[str, dict[str, Row]]] = defaultdict(dict)
    for (name, mode, dtype, shape), rows in sorted(groups.items()):
        if not any(row.tflops or row.gbs for row in rows.values()) or name.startswith(("test_copy", "test_matmul")):
            continue  # the ceilings are the dashed lines
        charts[(name, mode, dtype)][shape] = rows
    info = data.get("machine_info", {})
    cpu = f" ({info['cpu']})" if str(info.get("device", "")).startswith("cpu") and info.get("cpu") else ""
    subtitle = [f"{info.get('device', '?')}{cpu}, torch {info.get('torch')}, triton {info.get('triton')}, "
                f"git {info.get('git')}",
                f"{os.path.basename(path)}, {str(data.get('datetime', ''))[:16]}; bar labels: speed vs torch/SDPA"]
    os.makedirs(out_dir, exist_ok=True)
    written = []
    for (name, mode, dtype), shapes in charts.items():
        stem = re.sub(r"[^A-Za-z0-9]+", "-", f"{name.removeprefix('test_')}-{mode or ''}-{dtype or ''}").strip("-")
        title = f"{name.removeprefix('test_')}  {mode or ''}  {(dtype or '').removeprefix('torch.')}"
        target = os.path.join(out_dir, stem + ".svg")
        with open(target, "w") as f:
            f.write(chart(title, subtitle, shapes, colours, ceil, dtype))
        written.append(target)
    return written


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description="Table (and SVG charts) of a benchmark run.")
    parser.add_argument("path", help="pytest-benchmark JSON or a bench.jsonl")
    parser.add_argument("--plot", metavar="DIR", help="also write one SVG chart per benchmark into DIR")
    args = parser.parse_args()
    run = load(args.path)
    main(args.path, run)
    if args.plot:
        for target in plot(args.path, args.plot, run):
            print(f"# wrote {target}", file=sys.stderr)  # stdout stays the table, for > run.txt
