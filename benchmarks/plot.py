"""Throughput plots of a benchmark run (the JSON of `python -m benchmarks.run`), ours vs the baselines.

    python -m benchmarks.plot benchmarks/results/latest.json [--out plot.png]

One panel per op (and x axis: sequence length S for prefill ops, batch for decode ops); one colour per
shape series (V3.2, V4 k=512, ...); our op is the solid line, each baseline a dashed or dotted line of the
same colour. The y axis is the throughput the op is measured in: TFLOP/s for compute-bound ops, GB/s of
compulsory traffic for memory-bound ones (log scale: the reference is often 100x slower). Only measured
times are plotted (no extrapolated "~" references). Needs matplotlib, not a GPU.
"""
from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

LINESTYLES = {"ours": "-", "reference": ":", "torch": "--", "cudnn": "-."}


def throughput(row: dict, ms: float) -> float:
    """The row's work per time in its own metric."""
    if row.get("metric") == "GB/s":
        return row["bytes"] / ms / 1e6
    return row["flops"] / ms / 1e9


def panels(rows: list[dict]) -> dict:
    """(op, x_name, metric) -> {(series, impl): [(x, throughput), ...]} over the measured rows."""
    out: dict = {}
    for row in rows:
        if "flops" not in row or "metric" not in row:
            continue  # skipped before it ran
        lines = out.setdefault((row["op"], row["x_name"], row["metric"]), {})
        impls = [("ours (" + row.get("backend", "?") + ")", row.get("ms"))]
        impls += [(name, b.get("ms")) for name, b in row.get("baselines", {}).items() if b.get("status") == "ok"]
        for impl, ms in impls:
            if ms:
                lines.setdefault((row["series"], impl), []).append((row["x"], throughput(row, ms)))
    return {key: lines for key, lines in out.items() if lines}


def plot(result: dict, out_path: Path) -> Path:
    import matplotlib
    matplotlib.use("Agg")  # files only, no display
    import matplotlib.pyplot as plt

    groups = panels(result.get("rows", []))
    n = max(1, len(groups))
    cols = min(3, n)
    nrows = math.ceil(n / cols)
    fig, axes = plt.subplots(nrows, cols, figsize=(6.2 * cols, 4.4 * nrows), squeeze=False)
    colours = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for ax in axes.flat[len(groups):]:
        ax.axis("off")
    if not groups:
        axes[0][0].text(0.5, 0.5, "no measured rows", ha="center", va="center")
    for ax, ((op, x_name, metric), lines) in zip(axes.flat, sorted(groups.items())):
        series = sorted({s for s, _ in lines})
        for (s, impl), points in sorted(lines.items()):
            points.sort()
            style = LINESTYLES.get(impl.split(" ")[0].split("+")[0], "--")
            ax.plot([p[0] for p in points], [p[1] for p in points], style, marker="o", markersize=3,
                    color=colours[series.index(s) % len(colours)], label=f"{s}: {impl}")
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_title(op)
        ax.set_xlabel(x_name)
        ax.set_ylabel(metric)
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=6, loc="best")
    meta = result.get("meta", {})
    fig.suptitle(f"dsa_ops: {meta.get('device', '?')}, {meta.get('time', '')}", fontsize=10)
    fig.tight_layout(rect=(0, 0, 1, 0.97))  # room for the title
    out_path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out_path, dpi=110)
    plt.close(fig)
    return out_path


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("json", help="a results JSON of benchmarks.run")
    p.add_argument("--out", default=None, help="PNG path (default: the JSON's path with .png)")
    a = p.parse_args(argv)
    src = Path(a.json)
    result = json.loads(src.read_text())
    out = plot(result, Path(a.out) if a.out else src.with_suffix(".png"))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
