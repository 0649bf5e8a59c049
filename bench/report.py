"""Turn benchmark rows into ``bench/results``: JSON per module, ``summary.md`` and PNG plots."""

from __future__ import annotations

import json
import math
import os
import textwrap
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402  (the backend must be chosen first)

Row = dict[str, Any]


def write_atomic(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` via a ``.tmp`` sibling and a rename, so readers never see half a file."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)


def write_json(path: Path, payload: dict[str, Any]) -> None:
    """Write ``payload`` as indented JSON (non-finite floats become null)."""

    def clean(obj: Any) -> Any:
        if isinstance(obj, float) and not math.isfinite(obj):
            return None
        if isinstance(obj, dict):
            return {str(k): clean(v) for k, v in obj.items()}
        if isinstance(obj, (list, tuple)):
            return [clean(v) for v in obj]
        return obj

    write_atomic(path, (json.dumps(clean(payload), indent=1, allow_nan=False) + "\n").encode())


# -- markdown --------------------------------------------------------------------------------------
def fmt_value(value: float | None, unit: str) -> str:
    """Format a measured value: MB/s as a plain number, other units with the unit attached."""
    if value is None:
        return "–"
    if unit == "MB/s":
        return f"{value:,.0f}" if value >= 100 else f"{value:,.1f}"
    if unit == "ops/s":
        return f"{value / 1e6:.2f} Mops/s"
    return f"{value:.3g} {unit}"


def fmt_met(row: Row) -> str:
    """``yes`` / ``NO`` / ``–`` (informational) / ``ERROR``."""
    if row.get("error"):
        return "ERROR"
    if row.get("skipped"):
        return "skipped"
    if row.get("met") is None:
        return "– (info)"
    return "yes" if row["met"] else "**NO**"


def markdown_table(module: str, rows: Sequence[Row]) -> str:
    """Render rows as the summary table (measure | <module> MB/s | baseline | baseline MB/s | ratio | ...)."""
    lines = [
        f"| measure | {module} MB/s | baseline | baseline MB/s | ratio | target | met |",
        "|---|---:|---|---:|---:|---:|---|",
    ]
    for row in rows:
        if row.get("error"):
            lines.append(f"| {row['measure']} | ERROR (see {module}.json) | | | | | ERROR |")
            continue
        if row.get("skipped"):
            target = "–" if row.get("target") is None else f"≥ {row['target']:g}×"
            lines.append(f"| {row['measure']} | skipped: {row['skipped']} | {row['baseline']} | | | {target} | "
                         "skipped |")
            continue
        ratio = "–" if row.get("ratio") is None else f"{row['ratio']:.2f}×"
        target = "–" if row.get("target") is None else f"≥ {row['target']:g}×"
        lines.append(
            f"| {row['measure']} | {fmt_value(row['value'], row['unit'])} | {row['baseline']} | "
            f"{fmt_value(row['baseline_value'], row['unit'])} | {ratio} | {target} | {fmt_met(row)} |"
        )
    return "\n".join(lines)


def summary_markdown(results: Sequence[dict[str, Any]], machine: dict[str, Any], wall_s: float,
                     settings: dict[str, Any]) -> str:
    """The whole ``summary.md``: one table per module plus the run's settings and machine.

    Args:
        results: One entry per module, ``{"module": name, "rows": [...]}``.
        machine: Machine and package information.
        wall_s: Wall time of the whole run.
        settings: The knobs used (object size, repeats).
    """
    out = ["# Benchmark summary", ""]
    out.append(
        f"Object {settings['size_mb']} MiB, median of {settings['repeat']} repeats, "
        f"run took {wall_s:.0f} s on {machine.get('nproc')} CPUs ({machine.get('cpu_model', '?')}), "
        f"Python {machine.get('python')}. "
        "MB/s are decimal (10^6 bytes/s); ratio = system ÷ baseline (higher is better)."
    )
    code = machine.get("pcache_source_xxh3") or {}
    if code:
        changed = code.get("start") != code.get("end")
        tail = (f" at start, `{code.get('end')}` at the end: **the code changed during the run**" if changed
                else " (unchanged during the run).")
        out += ["", f"pcache source xxh3-128: `{code.get('start')}`{tail}"]
    for result in results:
        out += ["", f"## {result['module']}", ""]
        if result.get("earlier"):
            out += [f"(measured in an earlier run, started {result['earlier']}; this run did not include it)", ""]
        out.append(markdown_table(result["module"], result["rows"]))
        notes = []
        for r in result["rows"]:
            if r.get("error") or r.get("skipped"):
                continue
            paired = ", ".join(f"{x:.2f}" for x in r.get("paired_ratios") or [])
            notes.append(f"- **{r['key']}**: per-repeat ratios {paired}. {r.get('notes', '')}".rstrip())
        if notes:
            out += ["", "Notes:", "", *notes]
    return "\n".join(out) + "\n"


# -- plots -----------------------------------------------------------------------------------------
def _label(row: Row, width: int = 24) -> str:
    return "\n".join(textwrap.wrap(row["measure"], width))


def plot_throughput(path: Path, module: str, rows: Sequence[Row]) -> None:
    """Grouped bars: the module's MB/s next to its baseline's MB/s, per measure (log scale)."""
    rows = [r for r in rows if not r.get("error") and r.get("unit") == "MB/s" and r.get("value") is not None]
    fig, ax = plt.subplots(figsize=(max(8.0, 1.9 * len(rows) + 2), 6.5))
    if not rows:
        ax.text(0.5, 0.5, "no throughput results", ha="center", va="center", transform=ax.transAxes)
    width = 0.38
    xs = list(range(len(rows)))
    ours = ax.bar([x - width / 2 for x in xs], [r["value"] for r in rows], width, label=module,
                  color="#1f77b4")
    base = ax.bar([x + width / 2 for x in xs], [r["baseline_value"] for r in rows], width,
                  label="baseline (named under each group)", color="#bbbbbb", edgecolor="#666666")
    for bars in (ours, base):
        for bar in bars:
            h = bar.get_height()
            ax.annotate(f"{h:,.0f}", (bar.get_x() + bar.get_width() / 2, h), ha="center", va="bottom",
                        fontsize=7, xytext=(0, 2), textcoords="offset points")
    ax.set_xticks(xs)
    ax.set_xticklabels([f"{_label(r)}\n\nvs {textwrap.fill(r['baseline'], 24)}" for r in rows], fontsize=7)
    ax.set_yscale("log")
    ax.set_ylabel("MB/s (log scale, higher is better)")
    ax.set_title(f"{module}: throughput vs baseline (median of repeats)")
    ax.legend(loc="upper right", fontsize=8)
    ax.grid(axis="y", which="both", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_ratios(path: Path, module: str, rows: Sequence[Row]) -> None:
    """Bars from parity (1×) to each measure's ratio on a log axis, with its target marked.

    Green: target met; red: missed; grey: informational (no target).
    """
    rows = [r for r in rows if not r.get("error") and r.get("ratio") is not None]
    fig, ax = plt.subplots(figsize=(12, max(3.0, 0.75 * len(rows) + 1.5)))
    ys = list(range(len(rows)))[::-1]
    colors = ["#999999" if r["met"] is None else ("#2ca02c" if r["met"] else "#d62728") for r in rows]
    ratios = [max(r["ratio"], 1e-3) for r in rows]
    ax.barh(ys, [x - 1.0 for x in ratios], left=1.0, color=colors, height=0.6)
    for y, r, x in zip(ys, rows, ratios, strict=True):
        # Label right of everything drawn on this row (bar end, parity line, target), so nothing overlaps.
        anchor = max(x, 1.0, r.get("target") or 0.0)
        ax.annotate(f"{r['ratio']:.2f}×", (anchor, y), xytext=(6, 0), textcoords="offset points",
                    va="center", ha="left", fontsize=8, fontweight="bold")
        if r.get("target") is not None:
            ax.plot([r["target"], r["target"]], [y - 0.42, y + 0.42], color="black", linewidth=2.5)
            ax.annotate(f"target {r['target']:g}×", (r["target"], y + 0.42), xytext=(0, 1),
                        textcoords="offset points", ha="center", va="bottom", fontsize=6)
    ax.axvline(1.0, color="#555555", linestyle=":", linewidth=1)
    ax.set_xscale("log")
    values = ratios + [r["target"] for r in rows if r.get("target")] + [1.0]
    lo, hi = min(values) / 1.8, max(values) * 2.5
    ax.set_xlim(lo, hi)
    ticks = [t for t in (0.05, 0.1, 0.25, 0.5, 1, 2, 4, 10, 25, 50, 100) if lo <= t <= hi]
    ax.set_xticks(ticks)
    ax.set_xticklabels([f"{t:g}×" for t in ticks])
    ax.set_yticks(ys)
    ax.set_yticklabels([textwrap.fill(r["measure"], 40) for r in rows], fontsize=7)
    ax.set_xlabel("ratio to baseline, log scale (higher is better); black bar = target, dotted = parity")
    ax.set_title(f"{module}: ratio to baseline (green met, red missed, grey informational)")
    ax.grid(axis="x", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
