"""Combine the evaluations of several runs that differ in remain rate into one comparison:
held-out perplexity against active parameters per token for Read-ME and its baselines.

    python tools/compare_widths.py runs/compare_rr050 runs/compare_rr075 --out docs/compare

Each run is a `launch/train.py` run directory with eval/results.json (train + eval stages) and
train/summary.json (training tokens per model). Writes OUT/compare.json, OUT/compare.md (tables
per remain rate, and whether trained Read-ME beats the static pruned model at its width) and
OUT/ppl_vs_active.png. `make compare` runs the whole comparison.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

# models in the order of the issue: teacher, Read-ME through training, then the baselines
ORDER = [
    "dense teacher",
    "Read-ME (before training)",
    "Read-ME (after router phase)",
    "Read-ME (trained)",
    "layer-wise-router MoE",
    "static pruned dense",
]


def mean_ppl(model: dict[str, Any]) -> float:
    """Perplexity over all held-out tokens of the run: exp of the token-weighted mean NLL."""
    per = model["perplexity"].values()
    return math.exp(sum(d["nll_sum"] for d in per) / sum(d["n_tokens"] for d in per))


def _kl(model: dict[str, Any]) -> float | None:
    fid = (model.get("fidelity") or {}).values()
    n = sum(d["n_tokens"] for d in fid)
    return sum(d["kl_sum"] for d in fid) / n if n else None


def load_run(run: Path) -> dict[str, Any]:
    res_path = run / "eval" / "results.json"
    if not res_path.exists():
        raise SystemExit(f"{res_path} not found: run the train and eval stages for {run} first")
    res = json.loads(res_path.read_text())
    cfg = json.loads((run / "config.json").read_text())
    summ = run / "train" / "summary.json"
    train = json.loads(summ.read_text()) if summ.exists() else {}
    tokens = {
        kind: {ph: v["tokens"] for ph, v in s.items() if isinstance(v, dict) and "tokens" in v}
        for kind, s in train.items()
        if isinstance(s, dict)
    }
    models = {}
    for name, m in res["models"].items():
        models[name] = {
            "active_params": m["active_params"],
            "total_params": m["total_params"],
            "ppl": mean_ppl(m),
            "ppl_by_domain": {d: v["ppl"] for d, v in m["perplexity"].items()},
            "kl": _kl(m),
        }
    return {
        "run": str(run),
        "remain_rate": cfg["refactor"]["remain_rate"],
        "preset": cfg.get("preset"),
        "train_tokens": tokens,
        "eval_note": res["meta"].get("notes", []),
        "models": models,
    }


def verdict(r: dict[str, Any]) -> str:
    m = r["models"]
    a, b = m.get("Read-ME (trained)"), m.get("static pruned dense")
    if not a or not b:
        return "n/a (trained Read-ME or static baseline missing)"
    word = "beats" if a["ppl"] < b["ppl"] else "does NOT beat"
    return (
        f"trained Read-ME {word} the static pruned model: ppl {a['ppl']:.2f} vs {b['ppl']:.2f} at "
        f"{a['active_params'] / 1e6:.1f}M vs {b['active_params'] / 1e6:.1f}M active parameters"
    )


def render(runs: list[dict[str, Any]], cmd: str) -> str:
    lines = ["# Read-ME vs baselines at equal training tokens", "", f"Command: `{cmd}`", ""]
    for r in runs:
        dense = r["models"].get("dense teacher", {}).get("ppl")
        tok = r["train_tokens"]
        tok_s = ", ".join(
            f"{k}: " + " + ".join(f"{v} {ph}" for ph, v in t.items()) for k, t in tok.items()
        )
        domains = list(next(iter(r["models"].values()))["ppl_by_domain"])
        lines += [
            f"## remain rate {r['remain_rate']} (`{r['run']}`, preset {r['preset']})",
            "",
            f"Training tokens per model: {tok_s or 'n/a'}. " + " ".join(r["eval_note"]),
            "",
            "| model | active params | ppl (all) | x dense | KL(dense‖model) | "
            + " | ".join(domains)
            + " |",
            "|---|---|---|---|---|" + "---|" * len(domains),
        ]
        for name in sorted(r["models"], key=lambda n: ORDER.index(n) if n in ORDER else 99):
            m = r["models"][name]
            ratio = f"{m['ppl'] / dense:.2f}x" if dense else "–"
            per = " | ".join(f"{m['ppl_by_domain'][d]:.2f}" for d in domains)
            kl = f"{m['kl']:.3f}" if m["kl"] is not None else "–"
            lines.append(
                f"| {name} | {m['active_params'] / 1e6:.1f}M | {m['ppl']:.2f} | {ratio} | "
                f"{kl} | {per} |"
            )
        lines += ["", f"Verdict: {verdict(r)}.", ""]
    lines += ["![held-out perplexity vs active parameters](ppl_vs_active.png)", ""]
    return "\n".join(lines)


def series(runs: list[dict[str, Any]]) -> dict[str, list[tuple[float, float]]]:
    out: dict[str, list[tuple[float, float]]] = {}
    for r in runs:
        for name, m in r["models"].items():
            if name == "dense teacher" and name in out:
                continue
            out.setdefault(name, []).append((m["active_params"], m["ppl"]))
    return {k: sorted(v) for k, v in out.items()}


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("runs", nargs="+", help="run directories (one per remain rate)")
    ap.add_argument("--out", default=str(ROOT / "docs" / "compare"), help="output directory")
    a = ap.parse_args(argv)
    from readme_jax.eval.report import plot_ppl_vs_active

    runs = sorted((load_run(Path(r)) for r in a.runs), key=lambda r: r["remain_rate"])
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    cmd = "python tools/compare_widths.py " + " ".join(a.runs)
    (out / "compare.json").write_text(json.dumps({"command": cmd, "runs": runs}, indent=2))
    plot_ppl_vs_active(series(runs), out / "ppl_vs_active.png")
    text = render(runs, cmd)
    (out / "compare.md").write_text(text)
    print(text)


if __name__ == "__main__":
    main()
