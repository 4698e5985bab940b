"""The deploy report: what ``report.json`` holds and the table ``python -m mobileone_rs.deploy`` prints."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field

import yaml


@dataclass
class DeployReport:
    """What deploy wrote and measured. ``models`` has ``training``, ``fused_dual`` and ``deploy`` entries
    (layers, params, GFLOPs); ``errors`` the verification errors (relative, see ``bounds``)."""

    weights: str
    out: str
    head: str
    deploy_head: str
    note: str = ""
    files: dict[str, str] = field(default_factory=dict)
    models: dict[str, dict] = field(default_factory=dict)
    errors: dict[str, float] = field(default_factory=dict)
    bounds: dict[str, float] = field(default_factory=dict)
    latency_ms: dict[str, float] = field(default_factory=dict)
    half: dict | None = None
    int8: dict | None = None

    def to_dict(self) -> dict:
        return asdict(self)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2) + "\n"

    def __str__(self) -> str:
        rows = [
            f"{self.weights}: {self.head} -> {self.deploy_head}" + (f" ({self.note})" if self.note else "")
        ]
        rows.append(f"{'model':<12} {'layers':>7} {'params':>12} {'GFLOPs@640':>10}")
        for name, size in self.models.items():
            gflops = "-" if size.get("gflops") is None else f"{size['gflops']:.1f}"
            rows.append(f"{name:<12} {size['layers']:>7} {size['params']:>12,} {gflops:>10}")
        rows.append(f"{'check':<32} {'max rel err':>12} {'bound':>8}")
        for name, err in self.errors.items():
            bound = self.bounds.get(name)
            rows.append(f"{name:<32} {err:>12.3e} {'' if bound is None else f'{bound:.0e}':>8}")
        if self.latency_ms:
            rows.append(
                "latency (CPU, batch 1, median): "
                + ", ".join(f"{k} {v:.1f} ms" for k, v in self.latency_ms.items())
            )
        if self.half:
            rows.append(
                f"half: weights' rounding changes the output by {self.half['rel_error']:.3e} (relative)"
            )
        if self.int8:
            rows.extend(_int8_rows(self.int8))
        rows.extend(f"wrote {path}" for path in self.files.values())
        return "\n".join(rows)


def _db(value) -> str:
    return "-" if value is None else f"{value:.1f}"


def _int8_rows(int8: dict) -> list[str]:
    held = f"{int8['heldout_images']} held out"
    if int8.get("heldout_requested", int8["heldout_images"]) != int8["heldout_images"]:
        held += f" (of {int8['heldout_requested']} asked: at most half the images)"
    sqnr = int8["sqnr_db"]
    parts = ", ".join(f"{k} {_db(v)}" for k, v in sqnr.items() if " " in k)
    rows = [
        f"int8: {int8['calibration_images']} calibration images, {held}; "
        f"SQNR {_db(sqnr['overall'])} dB ({parts}); detection agreement mAP@0.5 "
        + ("-" if int8["map50_vs_float"] is None else f"{int8['map50_vs_float']:.3f}")
        + f" ({int8['float_detections']} float detections); latency INT8/float {int8['latency_ratio']:.2f}",
        "int8 input shape: " + "x".join(str(d) for d in int8.get("input_shape", [])),
    ]
    cle = int8.get("cle")
    if cle:
        rows.append(
            f"cross-layer equalization: {len(cle['pairs'])} conv pairs, worst-part SQNR on "
            f"{cle['decided_on'].split(',')[0]} {_db(cle['sqnr_db_without'])} -> "
            f"{_db(cle['sqnr_db_with'])} dB "
            f"(held out {_db(cle['heldout_sqnr_db_without'])} -> {_db(cle['heldout_sqnr_db_with'])}), "
            + ("applied" if cle["applied"] else "not applied")
        )
    return rows


def yaml_text(d: dict, source: str, kept: list[int]) -> str:
    """The deploy yaml in upstream's layout (one layer per line, its training-model index noted)."""
    lines = [f"# {source}'s main branch as a single-head model, written by python -m mobileone_rs.deploy", ""]
    for key, value in d.items():
        if key not in ("backbone", "head"):
            lines.append(yaml.safe_dump({key: value}, default_flow_style=False, sort_keys=False).rstrip())
    index = 0
    for section in ("backbone", "head"):
        lines += ["", f"{section}:", "  ["]
        for row in d[section]:
            text = yaml.safe_dump(row, default_flow_style=True, width=10_000).strip()
            old = f" (training layer {kept[index]})" if index < len(kept) else ""
            lines.append(f"   {text},  # {index}{old}")
            index += 1
        lines.append("  ]")
    text = "\n".join(lines) + "\n"
    assert yaml.safe_load(text) == d, "the deploy yaml does not read back as written"
    return text
