"""Results of a benchmark run: medians and ratios, the markdown table, the JSON file and the plot."""

from __future__ import annotations

import json
import statistics
from dataclasses import asdict, dataclass, field
from pathlib import Path

from mobileone_rs.files import replacing, write_text

MIB = 1024 * 1024
# Ratio of medians vs paired ratio: beyond this factor apart, the load changed during the metric.
NOISY_SPREAD = 1.2


@dataclass
class Row:
    """One measurement: the reference's and ours samples of one metric on one workload."""

    workload: str
    metric: str
    unit: str  # "s" or "bytes"
    ref: list[float]
    ours: list[float]
    target: float | None = None
    notes: dict = field(default_factory=dict)

    @property
    def ref_median(self) -> float:
        return statistics.median(self.ref)

    @property
    def ours_median(self) -> float:
        return statistics.median(self.ours)

    @property
    def ratio(self) -> float:
        """ours / reference, of the medians (below 1 means ours is faster or smaller)."""
        return self.ours_median / self.ref_median

    @property
    def paired_ratio(self) -> float:
        """Median of ours_i / ref_i over adjacent samples: robust when load shifts during a run.

        Adjacent samples share the machine's state, so this stays meaningful when the two medians
        above fall in different load regimes; when the two ratios disagree, the run was noisy.
        """
        return statistics.median(o / r for o, r in zip(self.ours, self.ref))

    @property
    def noisy(self) -> bool:
        """True when the ratio of medians and the paired ratio differ by more than NOISY_SPREAD."""
        low, high = sorted((self.ratio, self.paired_ratio))
        return high > low * NOISY_SPREAD

    @property
    def met(self) -> bool | None:
        return None if self.target is None else self.ratio <= self.target

    @property
    def label(self) -> str:
        return f"{self.workload}: {self.metric}"

    def summary(self) -> dict:
        """The row as JSON: samples, medians, ratio, target and whether it is met."""
        data = asdict(self)
        data.update(
            ref_median=self.ref_median,
            ours_median=self.ours_median,
            ratio=self.ratio,
            paired_ratio=self.paired_ratio,
            noisy=self.noisy,
            met=self.met,
        )
        return data

    @classmethod
    def from_summary(cls, data: dict) -> Row:
        """The row back from its JSON summary."""
        return cls(
            data["workload"],
            data["metric"],
            data["unit"],
            data["ref"],
            data["ours"],
            data["target"],
            data.get("notes", {}),
        )


def format_value(value: float, unit: str) -> str:
    """Seconds as ms or s, bytes as MiB."""
    if unit == "bytes":
        return f"{value / MIB:.1f} MiB"
    return f"{value * 1e3:.2f} ms" if value < 1 else f"{value:.3f} s"


def markdown_table(rows: list[Row]) -> str:
    """A README-ready table: workload, medians, ratio, target, met."""
    lines = [
        "| workload | ref median | ours median | ratio ours/ref | paired ratio | target | met? |",
        "|---|---:|---:|---:|---:|---:|:---:|",
    ]
    for row in rows:
        target = "-" if row.target is None else f"<= {row.target:g}"
        met = {None: "-", True: "yes", False: "**no**"}[row.met] + (" (noisy)" if row.noisy else "")
        lines.append(
            f"| {row.label} | {format_value(row.ref_median, row.unit)} | "
            f"{format_value(row.ours_median, row.unit)} | {row.ratio:.3f} | {row.paired_ratio:.3f} | "
            f"{target} | {met} |"
        )
    return "\n".join(lines)


def load_note(before: dict, after: dict) -> str:
    """One line on how busy the machine was; wall-clock medians are noisier when it was."""
    cpus = before["cpus"]
    note = f"machine load: 1-min load average {before['loadavg_1m']} -> {after['loadavg_1m']} on {cpus} CPUs"
    if "cpu_pressure_some_avg60" in after:
        note += f", CPU pressure (some, 60 s) {after['cpu_pressure_some_avg60']}%"
    if max(before["loadavg_1m"], after["loadavg_1m"]) > cpus:
        note += "; other work shared the CPUs, so compare the CPU-time ratios below as well"
    return note


def cpu_time_note(rows: list[Row]) -> str:
    """The process-CPU-time ratios of the timed rows, a second view on a shared machine."""
    parts = [
        f"{row.metric} {row.notes['cpu_time_ratio']:.3f}" for row in rows if "cpu_time_ratio" in row.notes
    ]
    return "CPU-time ratios ours/ref (median): " + "; ".join(parts) if parts else ""


def write_json(path: Path, meta: dict, rows: list[Row]) -> None:
    """Writes the run's metadata and every row (samples included)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    write_text(path, json.dumps({"meta": meta, "results": [row.summary() for row in rows]}, indent=2) + "\n")


def read_json(path: Path) -> tuple[dict, list[Row]]:
    """The metadata and rows of a saved run."""
    data = json.loads(path.read_text())
    return data["meta"], [Row.from_summary(row) for row in data["results"]]


def _bar_color(row: Row) -> str:
    """Green / red for a met / missed target; without a target, blue for training, orange for eval."""
    if row.met is not None:
        return "tab:green" if row.met else "tab:red"
    return "tab:blue" if row.metric == "training step" else "tab:orange"


def _bar_panel(ax, rows: list[Row], title: str) -> None:
    """Horizontal bars of ratios, each with its target tick and its paired ratio as a dot."""
    ys = list(range(len(rows)))[::-1]
    ax.barh(ys, [row.ratio for row in rows], color=[_bar_color(row) for row in rows], height=0.7)
    ax.plot([row.paired_ratio for row in rows], ys, "o", color="black", markersize=3)
    for y, row in zip(ys, rows):
        if row.target is not None:
            ax.vlines(row.target, y - 0.45, y + 0.45, colors="black", linewidth=2)
        ax.text(max(row.ratio, row.paired_ratio), y, f"  {row.ratio:.2f}", va="center", fontsize=8)
    ax.axvline(1.0, color="gray", linestyle="--", linewidth=1)
    ax.set_yticks(ys, [row.label for row in rows], fontsize=8)
    ax.set_xlabel(
        "bar: median(ours) / median(ref); dot: median of paired ratios; black tick: target; dashed: parity",
        fontsize=8,
    )
    ax.set_title(title, fontsize=10)


def write_plot(path: Path, chain_rows: list[Row], block_rows: list[Row], title: str) -> None:
    """A bar chart of ratios with the target lines: (a) the chain, (b) the single blocks."""
    try:
        import matplotlib
    except ImportError:  # a bare machine (the offline GPU bundle's): bench.json and the table suffice
        print(f"matplotlib is not installed: no plot ({path.name})")
        return

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = [
        (rows, name)
        for rows, name in ((chain_rows, "(a) chained stages"), (block_rows, "(b) single blocks"))
        if rows
    ]
    heights = [max(2.0, 0.28 * len(rows) + 1.0) for rows, _ in panels]
    fig, axes = plt.subplots(
        len(panels), 1, figsize=(10, sum(heights)), squeeze=False, gridspec_kw={"height_ratios": heights}
    )
    for ax, (rows, name) in zip(axes[:, 0], panels):
        _bar_panel(ax, rows, name)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    with replacing(path) as tmp:  # whole or not at all, as every file the package writes
        fig.savefig(tmp, dpi=120, format=path.suffix.lstrip(".") or "png")
    plt.close(fig)
