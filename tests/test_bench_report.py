"""bench/report.py's charts: each bar's height is its row's rate on the chart's axis, the
dashed line is the run's ceiling, and the labels are the ratios the table prints."""
from __future__ import annotations

import glob
import json
import os
import subprocess
import sys
import xml.etree.ElementTree as ET

import pytest

from bench import report

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SVG = "{http://www.w3.org/2000/svg}"


def _row(name: str, provider: str, shape: list[int], median_s: float, **extra) -> dict:
    return {"name": name, "extra_info": {"provider": provider, "shape": shape, "mode": "fwd",
                                         "dtype": "torch.bfloat16", "median_s": median_s, **extra}}


def _run(tmp_path) -> str:
    flops = 2e12  # TFLOP/s = 2 / median
    rows = [_row("test_matmul_rate", "torch", [8192] * 3, 1.0, ceiling="matmul", **{"TFLOP/s": 4.0}),
            _row("test_copy_bandwidth", "torch", [1 << 28], 1.0, ceiling="copy", **{"GB/s": 3000.0}),
            _row("test_softmax", "torch", [4, 1024], 0.5, **{"GB/s": 1000.0}),
            _row("test_softmax", "fusedformer-triton", [4, 1024], 0.25, **{"GB/s": 2000.0}),
            _row("test_softmax", "fusedformer-cuda", [4, 1024], 0.2, **{"GB/s": 2500.0})]
    for shape, medians in (([1, 2, 4096, 128], {"sdpa-flash": 1.0, "fusedformer-cuda": 0.8, "flex": 2.0}),
                           ([1, 2, 8192, 128], {"sdpa-flash": 2.0, "fusedformer-cuda": 1.0})):
        rows += [_row("test_attention[causal=True]", p, shape, m, causal=True, **{"TFLOP/s": flops / m / 1e12})
                 for p, m in medians.items()]
    path = tmp_path / "bench.jsonl"
    path.write_text("".join(json.dumps({**row, "machine_info": {"device": "test"}}) + "\n" for row in rows))
    return str(path)


def _bars(svg: ET.Element) -> dict[tuple[str, str], float]:
    return {(r.get("data-provider"), r.get("data-shape")): float(r.get("height"))
            for r in svg.iter(f"{SVG}rect") if r.get("class") == "bar"}


def test_bars_scale_with_the_rates_and_the_ceiling_sits_at_its_value(tmp_path):
    written = report.plot(_run(tmp_path), str(tmp_path / "plots"))
    names = sorted(os.path.basename(p) for p in written)
    assert names == ["attention-causal-True-fwd-torch-bfloat16.svg", "softmax-fwd-torch-bfloat16.svg"]  # no ceiling charts

    svg = ET.parse(tmp_path / "plots" / names[0]).getroot()
    bars = _bars(svg)
    assert len(bars) == 5  # flex ran at one shape only: no bar at the other
    px_per_tflops = bars[("sdpa-flash", "[1, 2, 4096, 128]")] / 2.0
    expected = {("sdpa-flash", "[1, 2, 4096, 128]"): 2.0, ("fusedformer-cuda", "[1, 2, 4096, 128]"): 2.5,
                ("flex", "[1, 2, 4096, 128]"): 1.0, ("sdpa-flash", "[1, 2, 8192, 128]"): 1.0,
                ("fusedformer-cuda", "[1, 2, 8192, 128]"): 2.0}
    for key, tflops in expected.items():
        assert bars[key] == pytest.approx(px_per_tflops * tflops, abs=0.2)

    axis_y = max(float(r.get("y")) + float(r.get("height")) for r in svg.iter(f"{SVG}rect") if r.get("class") == "bar")
    (ceiling,) = [line for line in svg.iter(f"{SVG}line") if line.get("class") == "ceiling"]
    assert axis_y - float(ceiling.get("y1")) == pytest.approx(px_per_tflops * 4.0, abs=0.2)  # the matmul ceiling

    labels = [t.text for t in svg.iter(f"{SVG}text")]
    for ratio in ("1.00x", "1.25x", "0.50x", "2.00x"):  # against sdpa-flash of the same shape
        assert ratio in labels
    assert "TFLOP/s" in labels and "matmul ceiling 4 TFLOP/s" in labels

    softmax = ET.parse(tmp_path / "plots" / names[1]).getroot()
    assert "GB/s" in [t.text for t in softmax.iter(f"{SVG}text")]  # byte-bound: rates in GB/s, copy ceiling
    assert [line.get("class") for line in softmax.iter(f"{SVG}line")].count("ceiling") == 1


def test_a_provider_keeps_its_colour_in_every_chart(tmp_path):
    report.plot(_run(tmp_path), str(tmp_path / "plots"))
    colours: dict[str, set[str]] = {}
    seen: dict[str, set[str]] = {}  # provider -> the charts it has bars in
    for path in glob.glob(str(tmp_path / "plots" / "*.svg")):
        for bar in ET.parse(path).getroot().iter(f"{SVG}rect"):
            if bar.get("class") == "bar":
                colours.setdefault(bar.get("data-provider"), set()).add(bar.get("fill"))
                seen.setdefault(bar.get("data-provider"), set()).add(path)
    assert any(len(charts) > 1 for charts in seen.values())  # fusedformer-cuda is in both charts
    assert all(len(c) == 1 for c in colours.values())
    assert len({c.pop() for c in colours.values()}) == len(colours)


@pytest.mark.parametrize("top, expected", [(0.494, [0, 0.1, 0.2, 0.3, 0.4, 0.5]), (33, [0, 5, 10, 15, 20, 25, 30, 35]),
                                           (700, [0, 100, 200, 300, 400, 500, 600, 700]), (1.0, [0, 0.2, 0.4, 0.6, 0.8, 1.0])])
def test_axis_ticks_are_round(top, expected):
    assert report.nice_ticks(top) == pytest.approx(expected)


def test_the_recorded_cpu_run_plots_from_the_command_line(tmp_path):
    recorded = os.path.join(ROOT, "bench", "results", "cpu-2core-2026-12-03-61046a3.json")
    done = subprocess.run([sys.executable, "bench/report.py", recorded, "--plot", str(tmp_path)], cwd=ROOT,
                          check=True, capture_output=True, text=True)
    charts = glob.glob(str(tmp_path / "*.svg"))
    assert len(charts) == done.stderr.count("# wrote ") == 14  # 4 attention, 4 ffn, 4 layer norm, 2 softmax
    assert "# wrote" not in done.stdout and done.stdout.count("test_attention") > 0  # the table alone
    for chart in charts:
        assert len(_bars(ET.parse(chart).getroot())) >= 4


def test_an_empty_run_is_a_clear_error(tmp_path):
    empty = tmp_path / "run.json"
    empty.write_text("")  # what pytest-benchmark leaves when -k selects no benchmark
    done = subprocess.run([sys.executable, "bench/report.py", str(empty)], cwd=ROOT, capture_output=True, text=True)
    assert done.returncode == 1 and "no benchmark ran" in done.stderr and "Traceback" not in done.stderr


def test_benchmarks_run_once_each_under_benchmark_disable():
    """`pytest bench --benchmark-disable` smoke-runs every row: measure runs fn once and times
    nothing (it used to read the stats that a disabled benchmark never has)."""
    done = subprocess.run([sys.executable, "-m", "pytest", "bench/bench_softmax.py", "--benchmark-disable", "-q",
                           "-p", "no:cacheprovider"], cwd=ROOT, capture_output=True, text=True)
    assert done.returncode == 0, done.stdout[-2000:]
    assert " passed" in done.stdout and "skipped" not in done.stdout


def test_each_dtype_is_held_to_its_own_matmul_ceiling(tmp_path):
    """A CPU run measures the matmul rate in fp32 and bf16 (AMX runs bf16 at another rate): a
    row's "% ceil" and its chart's dashed line use its own dtype's; a run with one matmul dtype
    (a GPU's bf16) holds every row to that one."""
    def matmul(dtype, rate):
        return {"name": f"test_matmul_rate[{dtype}]",
                "extra_info": {"provider": "torch", "ceiling": "matmul", "dtype": dtype, "TFLOP/s": rate}}

    both = report.ceilings([matmul("torch.float32", 0.3), matmul("torch.bfloat16", 1.2)])
    assert report.ceiling_for(both, "matmul", "torch.float32") == 0.3
    assert report.ceiling_for(both, "matmul", "torch.bfloat16") == 1.2
    assert report.ceiling_for(both, "matmul", "torch.float16") is None  # not measured: no share
    one = report.ceilings([matmul("torch.bfloat16", 900.0)])
    assert report.ceiling_for(one, "matmul", "torch.float32") == 900.0
    rows = {"[1, 2]": {"cpu": report.Row(1.0, None, 0.6)}}
    svg = ET.fromstring(report.chart("t", ["s"], rows, {"cpu": "#000"}, both, "torch.bfloat16"))
    label = [t.text for t in svg.iter(f"{SVG}text") if t.text and "ceiling" in t.text]
    assert label == ["matmul ceiling 1.2 TFLOP/s"]
