"""Markdown report with PNG plots from one JSON-able results dict.

`write_report(results, out_dir)` writes `results.json`, `report.md` and the plots whose data is
present. Every key is optional; tables keep only the columns some row has, and "mean ppl" /
"mean bpb" / KL / agreement in the summary are plain means over the model's plain-text domains
(the generated `chat` domain has its own columns: assistant-token KL and agreement, and the
answer test, under "skills"). Schema:

    {
      "meta": {"title": str, "command": str, "checkpoint": str, "created": str,
               "notes": [str]},
      "models": {                                  # table rows, in this order
        NAME: {                                    # e.g. "dense", "Read-ME", "layer-wise MoE"
          "kind": str, "total_params": int, "active_params": int,
          "perplexity": {DOMAIN: PerplexityResult.to_dict()},   # needs "ppl"; "bpb" optional
          "fidelity": {DOMAIN: FidelityResult.to_dict()},       # "kl", "top1_agreement"
          "mmlu": {SETTING: MCResult.to_dict()},                # SETTING e.g. "0-shot"
          "skills": {"chat": {"tokens", "kl", "top1_agreement", "nll"},  # assistant tokens
                     "answers": AnswerResult.to_dict(teacher)},          # eval/skills.py
          "decode_tok_s": float,
        }},
      "ppl_vs_active": {SERIES: [[active_params, ppl], ...]},  # else drawn from "models"
      "routing": {
        "experts": [str],                          # expert labels (default E0, E1, ...)
        "usage": Usage.to_dict(),                  # "domains", "counts" [D][E]
        "locality": {NAME: Locality.to_dict()},    # "keep_fraction", "run_lengths", ...
        "layerwise": LayerRedundancy.to_dict(),    # "mutual_information" [L-1], ...
      },
      "serving": {
        "hit_ratio": {POLICY: {C: ratio}},         # C = cache slots; ratio in [0, 1]
        "latency": {POLICY: [normalized latency per request]},
        "summary": {ROW: {COLUMN: number}},        # any further serve_bench table
      },
      "training": {"metrics": "path/to/metrics.jsonl" | [records], "keys": ["loss"]},
    }                                              # records: {"step", "loss", "phase", ...}
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import numpy as np

NA = "–"
RUN_CAP = 20  # locality histogram: longer runs are pooled


# ---------------------------------------------------------------- formatting
def fmt_params(n: float | None) -> str:
    if n is None:
        return NA
    for div, suf in ((1e9, "B"), (1e6, "M"), (1e3, "K")):
        if abs(n) >= div:
            return f"{n / div:.1f}{suf}"
    return str(int(n))


def fmt(x: Any, digits: int = 3) -> str:
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return NA
    if isinstance(x, (int, np.integer)) and not isinstance(x, bool):
        return str(int(x))
    if isinstance(x, (float, np.floating)):
        return f"{x:.{digits}f}"
    return str(x)


def pct(x: float | None) -> str:
    return NA if x is None else f"{100 * x:.1f}%"


def md_table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(lines) + "\n"


def jsonable(x: Any) -> Any:
    if isinstance(x, Mapping):
        return {str(k): jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [jsonable(v) for v in x]
    if isinstance(x, np.ndarray):
        return jsonable(x.tolist())
    if isinstance(x, np.integer):
        return int(x)
    if isinstance(x, np.floating):
        return float(x)
    if isinstance(x, Path):
        return str(x)
    return x


def _mean(xs: list[float | None]) -> float | None:
    xs = [x for x in xs if x is not None]
    return float(np.mean(xs)) if xs else None


# domains written by a model (data/chat.py), kept out of the plain-text means of the headline
GENERATED_DOMAINS = ("chat",)


def _text_mean(m: Mapping[str, Any], section: str, key: str) -> float | None:
    """Mean of `key` over the plain-text domains of `section` (generated domains left out:
    they have their own columns)."""
    sec = m.get(section, {})
    return _mean([d.get(key) for k, d in sec.items() if k not in GENERATED_DOMAINS])


def _f4(x: float) -> str:
    return fmt(x, 4)


def _answers(m: Mapping[str, Any], key: str) -> str | None:
    a = m.get("skills", {}).get("answers")
    if not a:
        return None
    return f"{a[key]}/{a['questions']}" if key == "right" else str(a[key])


# ---------------------------------------------------------------- tables
def _columns(models: Mapping[str, Any]) -> list[tuple[str, Callable[[dict], str]]]:
    """Headline columns, kept only when some model has the data."""
    cols: list[tuple[str, Callable[[dict], Any], Callable[[Any], str]]] = [
        ("active params", lambda m: m.get("active_params"), fmt_params),
        ("total params", lambda m: m.get("total_params"), fmt_params),
        ("mean ppl", lambda m: _text_mean(m, "perplexity", "ppl"), lambda x: fmt(x, 2)),
        ("mean bpb", lambda m: _text_mean(m, "perplexity", "bpb"), lambda x: fmt(x, 3)),
        ("KL(dense‖model)", lambda m: _text_mean(m, "fidelity", "kl"), lambda x: fmt(x, 4)),
        ("top-1 agree", lambda m: _text_mean(m, "fidelity", "top1_agreement"), pct),
        ("chat KL (answers)", lambda m: m.get("skills", {}).get("chat", {}).get("kl"), _f4),
        (
            "chat top-1 (answers)",
            lambda m: m.get("skills", {}).get("chat", {}).get("top1_agreement"),
            pct,
        ),
        ("questions right", lambda m: _answers(m, "right"), str),
        ("teacher's kept", lambda m: m.get("skills", {}).get("answers", {}).get("retention"), pct),
        ("empty answers", lambda m: _answers(m, "empty"), str),
    ]
    settings = sorted({s for m in models.values() for s in m.get("mmlu", {})})
    for s in settings:
        cols.append(
            (f"MMLU {s}", lambda m, s=s: m.get("mmlu", {}).get(s, {}).get("macro_acc"), pct)
        )
    cols.append(("decode tok/s", lambda m: m.get("decode_tok_s"), lambda x: fmt(x, 1)))
    keep = [(n, g, f) for n, g, f in cols if any(g(m) is not None for m in models.values())]
    return [(n, lambda m, g=g, f=f: f(g(m)) if g(m) is not None else NA) for n, g, f in keep]


def headline_table(results: Mapping[str, Any]) -> str:
    """Models x (params, perplexity, fidelity, MMLU, speed) as a Markdown table."""
    models = results.get("models") or {}
    if not models:
        return ""
    cols = _columns(models)
    rows = [[name] + [get(m) for _, get in cols] for name, m in models.items()]
    return md_table(["model"] + [n for n, _ in cols], rows)


def _by_domain_table(models: Mapping[str, Any], section: str, key: str, cell) -> str:
    domains: list[str] = []
    for m in models.values():
        domains += [d for d in m.get(section, {}) if d not in domains]
    has = [
        n
        for n, m in models.items()
        if any(key in v and v[key] is not None for v in m.get(section, {}).values())
    ]
    if not domains or not has:
        return ""
    rows = []
    for n in has:
        sec = models[n].get(section, {})
        rows.append([n] + [cell(sec[d].get(key)) if d in sec else NA for d in domains])
    return md_table(["model"] + domains, rows)


def _answers_md(models: Mapping[str, Any]) -> str:
    """The answer test question by question: each model's greedy answer (cut), right or not."""
    have = {
        n: m["skills"]["answers"] for n, m in models.items() if "answers" in m.get("skills", {})
    }
    if not have:
        return ""
    names = list(have)
    by_q: dict[str, list[str]] = {}
    for n in names:
        for a in have[n]["answers"]:
            text = a["answer"].replace("\n", " ").replace("|", "\\|")
            text = (text[:60] + "…") if len(text) > 60 else text
            by_q.setdefault(a["id"], []).append(
                ("✓ " if a["right"] else "✗ ") + (text or "(empty)")
            )
    rows = [[q] + cells for q, cells in by_q.items()]
    return (
        "<details><summary>answers, question by question (greedy, first 60 characters)</summary>"
        "\n\n" + md_table(["question"] + names, rows) + "\n</details>\n"
    )


def _mmlu_details(models: Mapping[str, Any]) -> str:
    out = []
    for name, m in models.items():
        for setting, r in m.get("mmlu", {}).items():
            per = r.get("per_subject", {})
            rows = [[s, pct(v.get("acc")), fmt(v.get("n"))] for s, v in sorted(per.items())]
            rows.append(["**macro average**", pct(r.get("macro_acc")), fmt(r.get("n"))])
            out.append(
                f"<details><summary>{name}, MMLU {setting}: per subject</summary>\n\n"
                + md_table(["subject", "acc", "n"], rows)
                + "\n</details>\n"
            )
    return "\n".join(out)


def _generic_table(table: Mapping[str, Mapping[str, Any]], first: str) -> str:
    cols: list[str] = []
    for r in table.values():
        cols += [c for c in r if c not in cols]
    rows = [[str(k)] + [fmt(r.get(c)) for c in cols] for k, r in table.items()]
    return md_table([first] + cols, rows)


def _sorted_curve(d: Mapping[Any, float]) -> tuple[list[float], list[float]]:
    pts = sorted((float(k), float(v)) for k, v in d.items())
    return [p[0] for p in pts], [p[1] for p in pts]


def _latency_stats(lat: list[float]) -> dict[str, float]:
    a = np.asarray(lat, np.float64)
    return {
        "n": int(a.size),
        "mean": float(a.mean()),
        "p50": float(np.percentile(a, 50)),
        "p95": float(np.percentile(a, 95)),
        "p99": float(np.percentile(a, 99)),
    }


# ---------------------------------------------------------------- plots
def _figure(ncols: int = 1, size=(6.0, 4.0)):
    from matplotlib.figure import Figure  # no pyplot: Agg canvas, no global backend state

    fig = Figure(figsize=(size[0] * ncols, size[1]), layout="constrained")
    return fig, fig.subplots(1, ncols, squeeze=False)[0]


def _save(fig, path: Path, integer_x: bool = False) -> Path:
    if integer_x:
        from matplotlib.ticker import MaxNLocator

        for ax in fig.axes:
            ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    fig.savefig(path, dpi=110)
    return path


def load_metrics(metrics: str | Path | list[dict]) -> list[dict]:
    if isinstance(metrics, (str, Path)):
        path = Path(metrics)
        if not path.is_file():
            return []
        lines = path.read_text().splitlines()
        return [json.loads(line) for line in lines if line.strip()]
    return list(metrics)


def plot_training(training: Mapping[str, Any], path: Path) -> Path | None:
    recs = [r for r in load_metrics(training.get("metrics", [])) if "step" in r]
    keys = [k for k in training.get("keys", ["loss"]) if any(k in r for r in recs)]
    if not recs or not keys:
        return None
    phases = list(dict.fromkeys(str(r.get("phase", "train")) for r in recs))
    fig, axes = _figure(len(phases))
    for ax, ph in zip(axes, phases, strict=True):
        rs = [r for r in recs if str(r.get("phase", "train")) == ph]
        for k in keys:
            pts = [(r["step"], r[k]) for r in rs if r.get(k) is not None]
            if pts:
                ax.plot(*zip(*pts, strict=True), label=k, lw=1.2)
        ax.set(title=f"phase: {ph}", xlabel="step", ylabel="value")
        ax.legend()
        ax.grid(alpha=0.3)
    return _save(fig, path)


def plot_usage(usage: Mapping[str, Any], experts: list[str] | None, path: Path) -> Path | None:
    counts = np.asarray(usage.get("counts", []), np.float64)
    if counts.ndim != 2 or counts.size == 0:
        return None
    frac = counts / np.maximum(counts.sum(1, keepdims=True), 1)
    domains = usage.get("domains") or [f"D{i}" for i in range(counts.shape[0])]
    experts = experts or [f"E{i}" for i in range(counts.shape[1])]
    D, E = counts.shape
    fig, (ax,) = _figure(size=(max(4.5, 1.5 + 0.8 * E), max(2.5, 1.2 + 0.5 * D)))
    im = ax.imshow(frac, cmap="viridis", vmin=0, vmax=max(frac.max(), 1e-9), aspect="auto")
    ax.set_xticks(range(len(experts)), experts, rotation=45, ha="right")
    ax.set_yticks(range(len(domains)), domains)
    for (i, j), v in np.ndenumerate(frac):
        ax.text(
            j,
            i,
            f"{100 * v:.0f}",
            ha="center",
            va="center",
            color="white" if v < 0.6 * frac.max() else "black",
            fontsize=8,
        )
    ax.set(title="expert usage by domain (% of domain tokens)", xlabel="expert")
    fig.colorbar(im, ax=ax)
    return _save(fig, path)


def plot_locality(locality: Mapping[str, Mapping[str, Any]], path: Path) -> Path | None:
    items = {
        n: np.asarray(v["run_lengths"], np.float64)
        for n, v in locality.items()
        if v.get("run_lengths") is not None and np.sum(v["run_lengths"]) > 0
    }
    if not items:
        return None
    fig, (ax,) = _figure()
    width = 0.8 / len(items)
    for i, (name, hist) in enumerate(items.items()):
        tokens = hist * np.arange(hist.size)  # tokens sitting in runs of length l
        binned = np.zeros(RUN_CAP + 1)  # runs of RUN_CAP or more share the last bar
        binned[: min(hist.size, RUN_CAP)] = tokens[:RUN_CAP]
        binned[RUN_CAP] = tokens[RUN_CAP:].sum()
        ls = np.arange(1, RUN_CAP + 1)
        kf = locality[name].get("keep_fraction")
        label = f"{name} (keep {pct(kf)})" if kf is not None else name
        offset = (i - (len(items) - 1) / 2) * width
        ax.bar(ls + offset, binned[1:] / binned.sum(), width, label=label)
    ax.set_xticks([1, 5, 10, 15, RUN_CAP], ["1", "5", "10", "15", f"≥{RUN_CAP}"])
    ax.set(
        title="temporal locality: tokens by same-expert run length",
        xlabel="run length",
        ylabel="fraction of tokens",
    )
    ax.legend()
    return _save(fig, path)


def plot_layer_mi(layerwise: Mapping[str, Any], path: Path) -> Path | None:
    mi = layerwise.get("mutual_information")
    if not mi:
        return None
    fig, (ax,) = _figure()
    ax.plot(range(len(mi)), mi, "o-", label="I(layer l; layer l+1)")
    if layerwise.get("log_n_experts") is not None:
        ax.axhline(layerwise["log_n_experts"], color="gray", ls="--", label="log E (identical)")
    ax.set(
        title="layer-wise routers: MI between adjacent layers' choices",
        xlabel="layer l",
        ylabel="nats",
        ylim=(0, None),
    )
    ax.legend()
    return _save(fig, path, integer_x=True)


def plot_hit_ratio(hit: Mapping[str, Mapping[Any, float]], path: Path) -> Path | None:
    if not hit:
        return None
    fig, (ax,) = _figure()
    for policy, curve in hit.items():
        xs, ys = _sorted_curve(curve)
        ax.plot(xs, [100 * y for y in ys], "o-", label=policy)
    ax.set(
        title="expert cache hit ratio", xlabel="cache capacity C (experts)", ylabel="hit ratio (%)"
    )
    ax.legend()
    ax.grid(alpha=0.3)
    return _save(fig, path, integer_x=True)


def plot_latency_cdf(latency: Mapping[str, list[float]], path: Path) -> Path | None:
    latency = {k: v for k, v in latency.items() if len(v)}
    if not latency:
        return None
    fig, (ax,) = _figure()
    for policy, lat in latency.items():
        a = np.sort(np.asarray(lat, np.float64))
        ax.step(a, np.arange(1, a.size + 1) / a.size, where="post", label=policy)
    ax.set(
        title="normalized latency CDF",
        xlabel="latency / generated token",
        ylabel="fraction of requests",
        ylim=(0, 1.01),
    )
    ax.legend()
    ax.grid(alpha=0.3)
    return _save(fig, path)


def _ppl_vs_active_series(results: Mapping[str, Any]) -> dict[str, list[tuple[float, float]]]:
    series = {k: [tuple(p) for p in v] for k, v in (results.get("ppl_vs_active") or {}).items()}
    if series:
        return series
    pts = {}
    for name, m in (results.get("models") or {}).items():
        ppl = _text_mean(m, "perplexity", "ppl")
        if m.get("active_params") and ppl is not None:
            pts[name] = [(m["active_params"], ppl)]
    return pts if len(pts) >= 2 else {}


def _plot_lines(series: Mapping[str, list], path: Path, scale: float, **labels) -> Path | None:
    """One line per name through its (x, y) points (x divided by `scale`), titled by `labels`
    (matplotlib's `Axes.set` keywords)."""
    fig, (ax,) = _figure()
    for name, pts in series.items():
        pts = sorted(pts)
        ax.plot([p[0] / scale for p in pts], [p[1] for p in pts], "o-", label=name)
    ax.set(**labels)
    ax.legend()
    ax.grid(alpha=0.3)
    return _save(fig, path)


def plot_ppl_vs_active(series: Mapping[str, list], path: Path) -> Path | None:
    """series: model -> [(active parameters, ppl)]; None when empty."""
    if not series:
        return None
    labels = dict(title="perplexity vs active parameters", xlabel="active parameters (M)")
    return _plot_lines(series, path, 1e6, ylabel="perplexity (mean over domains)", **labels)


def plot_ppl_vs_tokens(curves: Mapping[str, list], path: Path) -> Path | None:
    """curves: label -> [(expert-phase tokens, ppl)]; None when no label has two points."""
    if not any(len(pts) > 1 for pts in curves.values()):
        return None
    return _plot_lines(curves, path, 1e3, title="held-out perplexity vs training tokens",
                       xlabel="expert-phase training tokens (thousands)",
                       ylabel="perplexity (all tokens)")  # fmt: skip


# ---------------------------------------------------------------- report
def make_plots(results: Mapping[str, Any], out_dir: Path) -> dict[str, Path]:
    """All plots whose data is present: name -> PNG path."""
    routing = results.get("routing") or {}
    serving = results.get("serving") or {}
    jobs = {
        "ppl_vs_active": lambda p: plot_ppl_vs_active(_ppl_vs_active_series(results), p),
        "training": lambda p: plot_training(results.get("training") or {}, p),
        "routing_usage": lambda p: plot_usage(
            routing.get("usage") or {}, routing.get("experts"), p
        ),
        "locality": lambda p: plot_locality(routing.get("locality") or {}, p),
        "layer_mi": lambda p: plot_layer_mi(routing.get("layerwise") or {}, p),
        "hit_ratio": lambda p: plot_hit_ratio(serving.get("hit_ratio") or {}, p),
        "latency_cdf": lambda p: plot_latency_cdf(serving.get("latency") or {}, p),
    }
    out = {}
    for name, job in jobs.items():
        path = job(out_dir / f"{name}.png")
        if path is not None:
            out[name] = path
    return out


def _routing_md(routing: Mapping[str, Any], plots: Mapping[str, Path]) -> list[str]:
    out = []
    usage = routing.get("usage")
    if usage and usage.get("counts"):
        counts = np.asarray(usage["counts"], np.float64)
        frac = counts / np.maximum(counts.sum(1, keepdims=True), 1)
        experts = routing.get("experts") or [f"E{i}" for i in range(counts.shape[1])]
        rows = [[d] + [pct(v) for v in r] for d, r in zip(usage["domains"], frac, strict=True)]
        out += ["### Expert usage by domain\n", md_table(["domain"] + list(experts), rows)]
    if "routing_usage" in plots:
        out.append("![expert usage](routing_usage.png)\n")
    loc = routing.get("locality")
    if loc:
        rows = [
            [
                n,
                pct(v.get("keep_fraction")),
                f"{fmt(v.get('n_kept'))} / {fmt(v.get('n_pairs'))}",
                fmt(v.get("mean_run_length"), 2),
            ]
            for n, v in loc.items()
        ]
        out += [
            "### Temporal locality\n",
            md_table(["router", "keeps previous expert", "tokens", "mean run"], rows),
        ]
    if "locality" in plots:
        out.append("![locality](locality.png)\n")
    lw = routing.get("layerwise")
    if lw and lw.get("mutual_information"):
        nmi = lw.get("normalized_mi") or [None] * len(lw["mutual_information"])
        rows = [
            [f"{i}→{i + 1}", fmt(m, 4), fmt(n, 3)]
            for i, (m, n) in enumerate(zip(lw["mutual_information"], nmi, strict=True))
        ]
        out += [
            "### Layer-wise routers: mutual information between adjacent layers\n",
            f"log E = {fmt(lw.get('log_n_experts'), 4)} nats (identical choices).\n",
            md_table(["layers", "MI (nats)", "normalized MI"], rows),
        ]
    if "layer_mi" in plots:
        out.append("![layer MI](layer_mi.png)\n")
    return out


def _serving_md(serving: Mapping[str, Any], plots: Mapping[str, Path]) -> list[str]:
    out = []
    hit = serving.get("hit_ratio")
    if hit:
        caps = sorted({float(c) for v in hit.values() for c in v})
        rows = []
        for policy, curve in hit.items():
            byc = {float(c): r for c, r in curve.items()}
            rows.append([policy] + [pct(byc.get(c)) for c in caps])
        hdr = ["policy"] + [f"C={int(c) if c.is_integer() else c}" for c in caps]
        out += ["### Expert cache hit ratio\n", md_table(hdr, rows)]
    if "hit_ratio" in plots:
        out.append("![hit ratio](hit_ratio.png)\n")
    lat = {k: v for k, v in (serving.get("latency") or {}).items() if len(v)}
    if lat:
        out += [
            "### Normalized latency\n",
            _generic_table({k: _latency_stats(v) for k, v in lat.items()}, "policy"),
        ]
    if "latency_cdf" in plots:
        out.append("![latency CDF](latency_cdf.png)\n")
    if serving.get("summary"):
        out += ["### Serving summary\n", _generic_table(serving["summary"], "run")]
    return out


def render_markdown(results: Mapping[str, Any], plots: Mapping[str, Path] | None = None) -> str:
    plots = plots or {}
    meta = results.get("meta") or {}
    models = results.get("models") or {}
    out = [f"# {meta.get('title', 'readme_jax evaluation report')}\n"]
    for key in ("checkpoint", "command", "created"):
        if meta.get(key):
            out.append(f"- {key}: `{meta[key]}`")
    out += [f"- {n}" for n in meta.get("notes", [])] + [""]
    if models:
        out += ["## Summary\n", headline_table(results)]
        if any(g in m.get("perplexity", {}) for m in models.values() for g in GENERATED_DOMAINS):
            out.append(
                "Mean ppl / bpb / KL / top-1 are over the plain-text domains; the generated "
                "`chat` domain is in the per-domain tables and the chat and answer columns.\n"
            )
        sections = [
            ("Perplexity by domain", "perplexity", "ppl", lambda x: fmt(x, 2)),
            ("Bits per byte by domain", "perplexity", "bpb", lambda x: fmt(x, 3)),
            ("KL(dense ‖ model) by domain (nats/token)", "fidelity", "kl", lambda x: fmt(x, 4)),
            ("Top-1 agreement with the dense model by domain", "fidelity", "top1_agreement", pct),
        ]
        for title, sec, key, cell in sections:
            t = _by_domain_table(models, sec, key, cell)
            if t:
                out += [f"### {title}\n", t]
    if "ppl_vs_active" in plots:
        out += ["## Perplexity vs active parameters\n", "![ppl vs active](ppl_vs_active.png)\n"]
    answers = _answers_md(models)
    if answers:
        out += [
            "## Skills: the answer test\n",
            "Questions of `readme_jax/eval/data/questions.jsonl` through the chat template, "
            "greedy; "
            "*teacher's kept* = the share of the questions the dense teacher answers right that "
            "the model answers right too. *chat KL / top-1* are measured on the assistant tokens "
            "of held-out teacher conversations (the `chat` domain).\n",
            answers,
        ]
    details = _mmlu_details(models)
    if details:
        out += ["## MMLU\n", details]
    routing = _routing_md(results.get("routing") or {}, plots)
    if routing:
        out += ["## Routing\n"] + routing
    serving = _serving_md(results.get("serving") or {}, plots)
    if serving:
        out += ["## Serving\n"] + serving
    if "training" in plots:
        out += ["## Training\n", "![training curves](training.png)\n"]
    return "\n".join(out).rstrip() + "\n"


def write_report(results: Mapping[str, Any], out_dir: str | Path) -> dict[str, Any]:
    """Write results.json, report.md and the PNGs; returns their paths."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    results = jsonable(results)
    (out_dir / "results.json").write_text(json.dumps(results, indent=2, allow_nan=True))
    plots = make_plots(results, out_dir)
    (out_dir / "report.md").write_text(render_markdown(results, plots))
    return {"results": out_dir / "results.json", "report": out_dir / "report.md", "plots": plots}
