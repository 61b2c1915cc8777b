"""The train stage's summary: per model kind and phase, steps, tokens, steady-state tokens/s and
FLOP/s (from RUN/train/<kind>/metrics.jsonl), and its markdown table."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

_TABLE_HEAD = (
    "| model | phase | steps | tokens | tokens/s | GFLOP/s | of peak | loss first -> last |",
    "|---|---|---|---|---|---|---|---|",
)


def summarize(metrics_path: Path, peak_flops: float = 0.0) -> dict:
    """Per phase kind: steps, tokens, steady-state (first step of each phase left out) tokens/s
    and FLOP/s, their fraction of `peak_flops` (FLOP/s; None when 0), first/last loss."""
    if not metrics_path.exists():
        return {}
    recs = [json.loads(ln) for ln in metrics_path.read_text().splitlines() if ln.strip()]
    out: dict[str, Any] = {}
    for phase in ("router", "expert"):
        rs = [r for r in recs if r["phase"] == phase]
        if not rs:
            continue
        steady = [r for r in rs if not r["first"]] or rs
        dt = sum(r["dt"] for r in steady)
        tok = sum(r["tokens"] for r in steady)
        fl = sum(r["flops_s"] * r["dt"] for r in steady)
        last_round = max(r["round"] for r in rs)
        out[phase] = {
            "steps": len(rs),
            "tokens": sum(r["tokens"] for r in rs),
            "tok_s": tok / dt if dt else 0.0,
            "flops_s": fl / dt if dt else 0.0,
            "flops_frac": (fl / dt / peak_flops) if dt and peak_flops else None,
            "loss_first": rs[0]["loss"],
            "loss_last": [r for r in rs if r["round"] == last_round][-1]["loss"],
        }
        for k in ("router_acc", "kl", "ce", "top1_agree"):
            if k in rs[-1]:
                out[phase][f"{k}_last"] = rs[-1][k]
    return out


def summary_table(summary: dict, peak: float) -> str:
    """Markdown: one row per (model kind, phase) of `summarize` results; `peak` in FLOP/s."""
    lines = [f"Training summary (f32 matmul peak measured: {peak / 1e9:.1f} GFLOP/s)", ""]
    lines += _TABLE_HEAD
    for kind, s in summary.items():
        for phase, p in s.items():
            if not isinstance(p, dict):
                continue
            frac = f"{p['flops_frac']:.0%}" if p.get("flops_frac") else "-"
            loss = f"{p['loss_first']:.4f} -> {p['loss_last']:.4f}"
            lines.append(
                f"| {kind} | {phase} | {p['steps']} | {p['tokens']} | {p['tok_s']:.0f} | "
                f"{p['flops_s'] / 1e9:.1f} | {frac} | {loss} |"
            )
    return "\n".join(lines) + "\n"
