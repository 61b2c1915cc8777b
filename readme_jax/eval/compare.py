"""Runs that differ in remain rate, combined into one comparison: held-out perplexity against
active parameters per token for Read-ME and its baselines at equal training tokens.

  runs = [load_run(p) for p in ("runs/compare_rr0.5", "runs/compare_rr0.75")]
  write_comparison(runs, "docs/compare", command="make compare")

Each run is a `launch/train.py` run directory with eval/results.json (the eval stage),
config.json, and (when trained) train/summary.json and moe_init/model.json. Per run the summary
holds: remain rate, preset, training tokens per model kind and phase (from train/summary.json,
else planned from the config), the construction record (moe_init/model.json's "recipe"), and per
model active/total parameters, perplexity (all tokens and by domain), KL to the teacher and
`ppl_ci`: the paired 95% bootstrap interval of the mean per-window NLL difference to the static
pruned model on the same windows (None where per-window NLLs or the control are missing).
With training snapshots (`train.snapshots`) the summary's "curve" holds each model family's
perplexity at every evaluated expert-token count, Read-ME's interval against the static model at
the same count, drawn as OUT/ppl_vs_tokens.png.

A run that trained no static control (`train.baselines=none`) can borrow one from another run
(`load_run(run, control_run=...)`, `launch/compare.py --config.control=RUN`): allowed only when
both runs scored the same held-out windows (the dense teacher's per-window NLLs agree) and the
borrowed static model trained on as many expert-phase tokens as the run's Read-ME; the summary
names the run it came from ("control_run"). Equal token counts do not prove equal batches: that
is the caller's to ensure (same data, seed and router steps).
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import numpy as np

from readme_jax.errors import UserError
from readme_jax.eval.paired import paired_bootstrap
from readme_jax.eval.report import plot_ppl_vs_active, plot_ppl_vs_tokens

CONTROL = "static pruned dense"
# models in the order of the tables: teacher, Read-ME through training, then the baselines
ORDER = [
    "dense teacher",
    "Read-ME (before training)",
    "Read-ME (after router phase)",
    "Read-ME (trained)",
    "layer-wise-router MoE",
    CONTROL,
]
# the model kinds of a quality-vs-tokens curve: family -> (model name of the final, trained
# model; of the starting point, if evaluated). Snapshots are named "<family> @ N expert tokens"
# (eval/pipeline.snapshot_name, train.snapshots).
FAMILIES = {
    "Read-ME": ("Read-ME (trained)", "Read-ME (before training)", "readme"),
    "static pruned dense": (CONTROL, None, "static"),
    "layer-wise-router MoE": ("layer-wise-router MoE", None, "layerwise"),
}
PHASES_OF = {
    "readme": ("router", "expert"),
    "layerwise": ("router", "expert"),
    "static": ("expert",),
}


class CompareError(UserError):
    """A run directory that lacks what the comparison reads; the message names the stage."""


def mean_ppl(model: dict[str, Any]) -> float:
    """Perplexity over all held-out tokens of the run: exp of the token-weighted mean NLL."""
    per = model["perplexity"].values()
    return math.exp(sum(d["nll_sum"] for d in per) / sum(d["n_tokens"] for d in per))


def _kl(model: dict[str, Any]) -> float | None:
    fid = (model.get("fidelity") or {}).values()
    n = sum(d["n_tokens"] for d in fid)
    return sum(d["kl_sum"] for d in fid) / n if n else None


def window_nlls(model: dict[str, Any], domains: list[str]) -> np.ndarray | None:
    """[N] per-window mean NLLs (nats/token) over `domains` in order; None if any is missing."""
    per = model.get("perplexity") or {}
    if not all("window_nll" in (per.get(d) or {}) for d in domains):
        return None
    return np.concatenate([np.asarray(per[d]["window_nll"], np.float64) for d in domains])


def ppl_ci(
    model: dict[str, Any], control: dict[str, Any], level: float = 0.95, n_boot: int = 2000
) -> dict[str, Any] | None:
    """Paired interval of mean(window NLL of `model` - of `control`) over the same windows:
    {"control", "windows", "level", "nll_diff": [mean, lo, hi] (nats/token), "ppl_ratio":
    exp of those}; None without per-window NLLs or with different windows."""
    domains = list(control.get("perplexity") or {})
    a, b = window_nlls(model, domains), window_nlls(control, domains)
    if a is None or b is None or a.shape != b.shape or a.size == 0:
        return None
    m, lo, hi = paired_bootstrap(a - b, n_boot=n_boot, seed=0, level=level)
    return {
        "control": CONTROL,
        "windows": int(a.size),
        "level": level,
        "nll_diff": [m, lo, hi],
        "ppl_ratio": [math.exp(m), math.exp(lo), math.exp(hi)],
    }


def planned_train_tokens(cfg: dict[str, Any]) -> dict[str, dict[str, int]]:
    """Training tokens per model kind and phase that a run's config.json asks for: rounds x
    steps x batch x seq_len per phase, unset sizing keys from `train.presets[preset]` (as
    `train/config.py:resolve` reads them)."""
    t = dict(cfg.get("train") or {})
    preset = (t.get("presets") or {}).get(cfg.get("preset") or "", {})

    def get(key: str, default: Any = 0) -> Any:
        return t[key] if t.get(key) is not None else preset.get(key, default)

    rounds, seq, batch = get("rounds", 1), get("seq_len"), get("batch_size")
    per_step = {"router": (get("router_batch_size") or batch) * seq, "expert": batch * seq}
    steps = {"router": get("router_steps"), "expert": get("expert_steps")}
    baselines = [x.strip() for x in str(get("baselines", "") or "").split(",")]
    kinds = ["readme"] + [k for k in ("layerwise", "static") if k in baselines]
    return {
        k: {p: rounds * steps[p] * per_step[p] for p in PHASES_OF[k] if steps[p]} for k in kinds
    }


def train_tokens(run: Path, cfg: dict[str, Any]) -> dict[str, dict[str, int]]:
    """Tokens per model kind and phase: measured (train/summary.json), else planned (config)."""
    summ = run / "train" / "summary.json"
    train = json.loads(summ.read_text()) if summ.exists() else {}
    measured = {
        kind: {ph: v["tokens"] for ph, v in s.items() if isinstance(v, dict) and "tokens" in v}
        for kind, s in train.items()
        if isinstance(s, dict)
    }
    measured = {k: v for k, v in measured.items() if v}
    return measured or planned_train_tokens(cfg)


def construction(run: Path) -> dict[str, Any] | None:
    """The recipe record the run's Read-ME was built with (moe_init/model.json "recipe")."""
    meta = run / "moe_init" / "model.json"
    return json.loads(meta.read_text()).get("recipe") if meta.exists() else None


def _read(run: Path) -> tuple[dict[str, Any], dict[str, Any]]:
    res_path, cfg_path = run / "eval" / "results.json", run / "config.json"
    for p in (res_path, cfg_path):
        if not p.exists():
            raise CompareError(f"{p} not found: run the train and eval stages for {run} first")
    return json.loads(res_path.read_text()), json.loads(cfg_path.read_text())


def _borrow_control(run: Path, res: dict, tokens: dict, control_run: Path) -> dict[str, Any]:
    """control_run's static pruned model for `run` (its results and `train_tokens`; module
    doc); raises CompareError when the windows or the training tokens differ, or control_run
    has no static model."""
    c_res, c_cfg = _read(control_run)
    control = c_res["models"].get(CONTROL)
    if control is None:
        raise CompareError(
            f"{control_run} has no {CONTROL!r}: train it with train.baselines=static"
        )
    teacher, c_teacher = res["models"].get("dense teacher"), c_res["models"].get("dense teacher")
    domains = list(control.get("perplexity") or {})
    a = window_nlls(teacher, domains) if teacher else None
    b = window_nlls(c_teacher, domains) if c_teacher else None
    if a is None or b is None or a.shape != b.shape or np.abs(a - b).max() > 1e-4:
        raise CompareError(
            f"{run} and {control_run} scored different held-out windows (domains, eval tokens or "
            "sequence length differ): the control cannot be borrowed"
        )
    mine = tokens.get("readme", {}).get("expert")
    theirs = train_tokens(control_run, c_cfg).get("static", {}).get("expert")
    if mine != theirs:
        raise CompareError(
            f"{control_run}'s static model trained on {theirs} expert-phase tokens, {run}'s "
            f"Read-ME on {mine}: not a comparison at equal tokens"
        )
    return control


def load_run(run: str | Path, control_run: str | Path | None = None) -> dict[str, Any]:
    """One run's summary (module doc); control_run: a run whose static pruned model is the
    control when `run` has none. Raises CompareError without eval/results.json or config.json,
    or when the control cannot be borrowed."""
    run = Path(run)
    res, cfg = _read(run)
    tokens = train_tokens(run, cfg)
    control, borrowed = res["models"].get(CONTROL), None
    if control is None and control_run:
        control = _borrow_control(run, res, tokens, Path(control_run))
        res["models"][CONTROL], borrowed = control, str(control_run)
    models = {}
    for name, m in res["models"].items():
        models[name] = {
            "active_params": m["active_params"],
            "total_params": m["total_params"],
            "ppl": mean_ppl(m),
            "ppl_by_domain": {d: v["ppl"] for d, v in m["perplexity"].items()},
            "kl": _kl(m),
            # snapshots' intervals are against the control at their own tokens ("curve")
            "ppl_ci": ppl_ci(m, control)
            if control and name != CONTROL and not _snapshot_family(name)
            else None,
        }
    return {
        "run": str(run),
        "remain_rate": cfg["refactor"]["remain_rate"],
        "preset": cfg.get("preset"),
        "train_tokens": tokens,
        "construction": construction(run),
        "control_run": borrowed,
        "eval_note": res["meta"].get("notes", []),
        "models": models,
        "curve": token_curve(res["models"], tokens),
    }


def _snapshot_family(name: str) -> str | None:
    """The family of a snapshot's model name ("<family> @ N expert tokens",
    eval/pipeline.snapshot_name), None for any other model."""
    head, sep, _ = name.partition(" @ ")
    return head if sep and head in FAMILIES else None


def _family_points(
    models: dict[str, Any], tokens: dict[str, dict[str, int]]
) -> dict[str, dict[int, str]]:
    """family -> {expert-phase tokens: model name} for every evaluated model of the family."""
    out: dict[str, dict[int, str]] = {}
    for fam, (final, start, kind) in FAMILIES.items():
        pts: dict[int, str] = {}
        if start and start in models:
            pts[0] = start
        for name, m in models.items():
            if _snapshot_family(name) == fam:
                pts[int(m["expert_tokens"])] = name  # from its model.json
        n = tokens.get(kind, {}).get("expert")
        if final in models and n is not None:
            pts[int(n)] = final  # the trained model stands for its own token count
        if pts:
            out[fam] = dict(sorted(pts.items()))
    return out


def token_curve(res_models: dict[str, Any], tokens: dict[str, dict[str, int]]) -> dict[str, Any]:
    """family -> [{"expert_tokens", "model", "ppl", "ppl_ci"}]: each evaluated point of a run's
    quality-vs-tokens curve; `ppl_ci` (ppl_ci's record) against the static pruned model at the
    same token count where one was evaluated, else None."""
    pts = _family_points(res_models, tokens)
    static = pts.get(CONTROL, {})
    out: dict[str, Any] = {}
    for fam, by_tok in pts.items():
        rows = []
        for t, name in by_tok.items():
            m = res_models[name]
            ctl = res_models.get(static.get(t, ""))
            ci = ppl_ci(m, ctl) if ctl is not None and fam != CONTROL else None
            rows.append({"expert_tokens": t, "model": name, "ppl": mean_ppl(m), "ppl_ci": ci})
        out[fam] = rows
    return out


def _ci_cell(ci: dict[str, Any] | None) -> str:
    if not ci:
        return "–"
    m, lo, hi = ci["nll_diff"]
    return f"{m:+.3f} [{lo:+.3f}, {hi:+.3f}]"


def verdict(r: dict[str, Any]) -> str:
    """One sentence: does trained Read-ME beat the static pruned model at its width?"""
    m = r["models"]
    a, b = m.get("Read-ME (trained)"), m.get(CONTROL)
    if not a or not b:
        return "n/a (trained Read-ME or static baseline missing)"
    word = "beats" if a["ppl"] < b["ppl"] else "does NOT beat"
    ci = a.get("ppl_ci")
    if ci:
        lo, hi = ci["nll_diff"][1:]
        word += (
            " (interval excludes 0)" if lo > 0 or hi < 0 else " (within noise: interval spans 0)"
        )
    return (
        f"trained Read-ME {word} the static pruned model: ppl {a['ppl']:.2f} vs {b['ppl']:.2f} at "
        f"{a['active_params'] / 1e6:.1f}M vs {b['active_params'] / 1e6:.1f}M active parameters"
    )


def render(runs: list[dict[str, Any]], cmd: str) -> str:
    """compare.md: one table per run, a verdict line each, the plot."""
    lines = ["# Read-ME vs baselines at equal training tokens", "", f"Command: `{cmd}`", ""]
    for r in runs:
        dense = r["models"].get("dense teacher", {}).get("ppl")
        tok_s = ", ".join(
            f"{k}: " + " + ".join(f"{v} {ph}" for ph, v in t.items())
            for k, t in r["train_tokens"].items()
        )
        domains = list(next(iter(r["models"].values()))["ppl_by_domain"])
        rec = r.get("construction") or {}
        lines += [
            f"## remain rate {r['remain_rate']} (`{r['run']}`, preset {r['preset']})",
            "",
            f"Training tokens per model: {tok_s or 'n/a'}. " + " ".join(r["eval_note"]),
        ]
        if r.get("control_run"):
            src = r["control_run"]
            lines += ["", f"Static control borrowed from `{src}` (same windows, tokens)."]
        if rec:
            lines += ["", "Construction: " + ", ".join(f"{k} {v}" for k, v in rec.items()) + "."]
        lines += [
            "",
            "| model | active params | ppl (all) | x dense | KL(dense‖model) | "
            "ΔNLL vs static [95% CI] | " + " | ".join(domains) + " |",
            "|---|---|---|---|---|---|" + "---|" * len(domains),
        ]
        for name in sorted(r["models"], key=lambda n: ORDER.index(n) if n in ORDER else 99):
            m = r["models"][name]
            ratio = f"{m['ppl'] / dense:.2f}x" if dense else "–"
            per = " | ".join(f"{m['ppl_by_domain'][d]:.2f}" for d in domains)
            kl = f"{m['kl']:.3f}" if m["kl"] is not None else "–"
            lines.append(
                f"| {name} | {m['active_params'] / 1e6:.1f}M | {m['ppl']:.2f} | {ratio} | "
                f"{kl} | {_ci_cell(m.get('ppl_ci'))} | {per} |"
            )
        lines += ["", f"Verdict: {verdict(r)}.", ""]
        lines += _curve_table(r)
    lines += ["![held-out perplexity vs active parameters](ppl_vs_active.png)", ""]
    if any(len(v) > 1 for r in runs for v in (r.get("curve") or {}).values()):
        lines += ["![held-out perplexity vs training tokens](ppl_vs_tokens.png)", ""]
    return "\n".join(lines)


def _curve_table(r: dict[str, Any]) -> list[str]:
    """The run's perplexity at each evaluated token count (train.snapshots), if more than one."""
    curve = r.get("curve") or {}
    toks = sorted({p["expert_tokens"] for v in curve.values() for p in v})
    if len(toks) < 2:
        return []
    dense = r["models"].get("dense teacher", {}).get("ppl")
    lines = [
        "Along training (expert-phase tokens; ΔNLL against the static model at the same tokens):",
        "",
        "| expert tokens | " + " | ".join(curve) + " | Read-ME vs static [95% CI] |",
        "|---|" + "---|" * (len(curve) + 1),
    ]
    for t in toks:
        cells, ci = [], None
        for fam, pts in curve.items():
            p = next((p for p in pts if p["expert_tokens"] == t), None)
            x = f" ({p['ppl'] / dense:.2f}x)" if p and dense else ""
            cells.append(f"{p['ppl']:.2f}{x}" if p else "–")
            if p and fam == "Read-ME":
                ci = p["ppl_ci"]
        lines.append(f"| {t:,} | " + " | ".join(cells) + f" | {_ci_cell(ci)} |")
    return [*lines, ""]


def series(runs: list[dict[str, Any]]) -> dict[str, list[tuple[float, float]]]:
    """model -> [(active params, ppl)] over the runs (the teacher once), for the plot."""
    out: dict[str, list[tuple[float, float]]] = {}
    for r in runs:
        for name, m in r["models"].items():
            if (name == "dense teacher" and name in out) or _snapshot_family(name):
                continue
            out.setdefault(name, []).append((m["active_params"], m["ppl"]))
    return {k: sorted(v) for k, v in out.items()}


def curves(runs: list[dict[str, Any]]) -> dict[str, list[tuple[int, float]]]:
    """ "<family>, remain rate r" -> [(expert tokens, ppl)] over the runs, for the plot."""
    out = {}
    for r in runs:
        for fam, pts in (r.get("curve") or {}).items():
            label = f"{fam}, remain rate {r['remain_rate']}"
            out[label] = [(p["expert_tokens"], p["ppl"]) for p in pts]
    return out


def write_comparison(runs: list[dict[str, Any]], out: str | Path, command: str) -> str:
    """OUT/compare.json ({"command", "runs"}), OUT/compare.md, OUT/ppl_vs_active.png and, when
    a run evaluated more than one token count (train.snapshots), OUT/ppl_vs_tokens.png; runs
    sorted by remain rate; returns the markdown."""
    runs = sorted(runs, key=lambda r: r["remain_rate"])
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "compare.json").write_text(json.dumps({"command": command, "runs": runs}, indent=2))
    plot_ppl_vs_active(series(runs), out / "ppl_vs_active.png")
    plot_ppl_vs_tokens(curves(runs), out / "ppl_vs_tokens.png")
    text = render(runs, command)
    (out / "compare.md").write_text(text)
    return text
