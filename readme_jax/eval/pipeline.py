"""The eval stage: every model in a run directory, scored the same way, into one report.

Models found under RUN (any subdirectory with a model.json): the untrained and trained Read-ME
MoEs and the baselines; plus the dense teacher (the run's source checkpoint). For each:
perplexity and bits per byte per domain on the held-out split, KL(teacher || model) and top-1
agreement, MMLU (0-shot, optional 5-shot, `eval.mmlu_limit` questions per subject), active
parameters. For Read-ME: expert usage by domain and temporal locality; for the layer-wise
baseline: mutual information between adjacent layers' choices.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import shlex
import sys
import time
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from readme_jax.checkpoints import models
from readme_jax.checkpoints.tokenizer import with_end_ids
from readme_jax.data.tasks import by_subject, kshot_prompt, load_mmlu
from readme_jax.decode.generator import Generator
from readme_jax.decode.steps import dense_model, readme_model
from readme_jax.eval import routing as rt
from readme_jax.eval import skills
from readme_jax.eval.domains import domain_stream, evaluate_domains_many
from readme_jax.eval.multiple_choice import score_multiple_choice
from readme_jax.eval.perplexity import dense_logits_fn
from readme_jax.eval.report import headline_table, write_report
from readme_jax.model import llama, moe
from readme_jax.model.config import LlamaConfig, ReadMEConfig
from readme_jax.model.readme import readme_forward, route
from readme_jax.model.spec import ExpertSpec
from readme_jax.refactor.pipeline import parse_domains

NICE = {
    "moe_init": "Read-ME (before training)",
    "moe_router": "Read-ME (after router phase)",
    "moe_trained": "Read-ME (trained)",
    "baseline_layerwise": "layer-wise-router MoE",
    "baseline_static": "static pruned dense",
}


@functools.cache
def readme_logits_fn(rc: ReadMEConfig):
    """Logits of a Read-ME model over whole windows, with the evaluation dispatch that
    `moe.pick_dispatch` picks (blocked on CPU for a ragged model; measurements there)."""
    dispatch = moe.pick_dispatch(None, "eval", model=rc.moe.dispatch)
    rc = rc.replace(moe=dataclasses.replace(rc.moe, dispatch=dispatch))

    def fn(params, tokens_BxS):
        return readme_forward(params, tokens_BxS, rc)[0]

    return fn


def load_any(path: Path) -> tuple[str, Any, Any, dict]:
    """(kind, config, params, meta) for a model directory of this project (kind "dense" or
    "readme_moe"; meta is model.json with "_path")."""
    return models.load_project(path)


# RUN/snapshots/<output>_<tokens>/ (train.snapshots): "<family> @ <tokens> expert tokens"
FAMILY = {
    "moe_trained": "Read-ME",
    "baseline_layerwise": "layer-wise-router MoE",
    "baseline_static": "static pruned dense",
}


def snapshot_name(path: Path) -> str | None:
    """The table name of a training snapshot directory, or None for any other model."""
    base, _, tokens = Path(path).name.rpartition("_")
    if Path(path).parent.name != "snapshots" or base not in FAMILY or not tokens.isdigit():
        return None
    return f"{FAMILY[base]} @ {int(tokens):,} expert tokens"


def discover(run: Path, skip: tuple[str, ...] = ()) -> list[Path]:
    """The models of a run directory in table order; then its training snapshots (by model,
    then tokens) unless `skip` names "snapshots"."""
    order = ["moe_init", "moe_router", "moe_trained", "baseline_layerwise", "baseline_static"]
    found = models.list_models(run, skip)
    found = sorted(found, key=lambda p: (order.index(p.name) if p.name in order else 99, p.name))
    if "snapshots" in skip:
        return found
    snaps = [p for p in models.list_models(run / "snapshots", skip) if snapshot_name(p)]
    return found + sorted(snaps, key=_snapshot_key)


def _snapshot_key(path: Path) -> tuple[str, int]:
    base, _, tokens = path.name.rpartition("_")
    return base, int(tokens)


def _active_params(kind: str, cfg, meta: dict, params) -> tuple[int, int]:
    if kind == "dense":
        return cfg.param_count(), cfg.param_count()
    m = cfg.model
    spec = models.load_expert_spec(meta["_path"])
    a = moe.active_param_count(m, spec.shared_widths, spec.expert_widths, cfg.moe.top_k)
    total = (
        m.param_count()
        - a["dense_ffn"]
        + int(3 * m.dim * (spec.shared_widths.sum() + spec.expert_widths.sum()))
    )
    router = 0 if "router" not in params else sum(x.size for x in jax.tree.leaves(params["router"]))
    # the router's embedding is a table lookup: one row per token is touched, not the table
    r_active = router - (params["router"]["embed"].size - m.dim if router else 0) if router else 0
    return total + router, a["active"] + r_active


def routing_analysis(rc: ReadMEConfig, params, streams: dict[str, tuple], experts, window: int):
    """Expert usage by domain (the streams' keys) and temporal locality of the pre-gating
    router; `experts` names the experts (the domains for domain experts, cluster0.. for
    clustered ones)."""
    route_fn = jax.jit(lambda p, t: route(p, t, rc)[1][0][..., 0])
    ids = {}
    for d, (toks, _) in streams.items():
        n = (len(toks) // window) * window
        rows = np.asarray(toks[:n]).reshape(-1, window)[:8]
        ids[d] = np.asarray(route_fn(params, jnp.asarray(rows, jnp.int32)))
    E = rc.moe.num_experts
    usage = rt.expert_usage({d: v.ravel() for d, v in ids.items()}, E)
    loc = rt.temporal_locality([row for v in ids.values() for row in v])
    return {
        "experts": list(experts),
        "usage": usage.to_dict(),
        "locality": {"Read-ME": loc.to_dict()},
    }


def layerwise_analysis(rc: ReadMEConfig, params, streams, window: int):
    fn = jax.jit(lambda p, t: readme_forward(p, t, rc)[1]["layer_logits"])
    choices = []
    for toks, _ in streams.values():
        n = (len(toks) // window) * window
        rows = jnp.asarray(np.asarray(toks[:n]).reshape(-1, window)[:2], jnp.int32)
        choices.append(np.asarray(jnp.argmax(fn(params, rows), -1)).reshape(rc.model.n_layers, -1))
    return rt.layer_redundancy(np.concatenate(choices, 1), rc.moe.num_experts).to_dict()


def _mmlu(logits_fn, params, tok, cfg: LlamaConfig, c) -> dict[str, Any]:
    qs = load_mmlu()
    out = {}
    shots = [int(s) for s in str(c.eval.mmlu_shots).split(",") if s.strip()]
    pool = by_subject(qs)
    for k in shots:
        res = score_multiple_choice(
            logits_fn,
            params,
            tok,
            qs,
            prompt_fn=lambda q, k=k: kshot_prompt(q, pool, k),
            limit=c.eval.mmlu_limit,
            batch_size=c.eval.batch_size,
            max_len=cfg.max_seq_len,
            progress=f"MMLU {k}-shot",
        )
        out[f"{k}-shot"] = res.to_dict()
    return out


def _greedy_fn(kind: str, mc, params) -> skills.GenerateFn | None:
    """Batched greedy generation of one model for the answer test (None: the decode library
    has no step for it, i.e. the layer-wise-router baseline). The Generator (a device copy of
    the params) is built on the first call, so a run without the answer test builds none."""
    if kind == "dense":
        model = dense_model(mc.replace(scan_layers=False))
    elif not mc.moe.layerwise:
        model = readme_model(mc)
    else:
        return None
    gen = functools.cache(lambda: Generator(model, params))
    return lambda prompts, n: gen().generate(prompts, n)


def _skills(
    c, tok, teacher: tuple, models_: dict[str, tuple], domains: list[str]
) -> dict[str, dict]:
    """{name: {"chat": assistant-token fidelity, "answers": the answer test}} for the teacher
    ("dense teacher") and each model. `teacher` and each value of `models_` are (logits_fn,
    eval params, greedy GenerateFn or None). Assistant-token fidelity needs the `chat` domain
    among the run's domains."""
    out: dict[str, dict] = {"dense teacher": {}, **{n: {} for n in models_}}
    if "chat" in domains:
        rows, mask = skills.conversation_rows(
            tok, c.eval.split, max_len=c.eval.get("chat_len", 256), cache=c.data.cache or None
        )
        students = {n: v[:2] for n, v in models_.items()}
        fid = skills.chat_fidelity_many(teacher[:2], students, rows, mask, c.eval.batch_size)
        for n, f in fid.items():
            out[n]["chat"] = f
    n_tok = c.eval.get("answer_tokens", 48)
    if n_tok > 0:
        qs = skills.load_questions(c.eval.get("questions", "") or skills.QUESTIONS)
        ref = skills.answer_test(teacher[2], tok, qs, n_tok)
        out["dense teacher"]["answers"] = ref.to_dict()
        for n, (_, _, gen) in models_.items():
            if gen is not None:
                out[n]["answers"] = skills.answer_test(gen, tok, qs, n_tok).to_dict(ref)
    return out


def _meta(c) -> dict[str, Any]:
    return {
        "title": f"Read-ME evaluation: {c.name}",
        "command": shlex.join(["python", *sys.argv]),  # the command that ran it
        "checkpoint": c.model.checkpoint or "SmolLM2-135M-Instruct (bundled GGUF)",
        "created": time.strftime("%Y-%m-%d %H:%M"),
        "notes": [
            f"held-out split '{c.eval.split}', first {c.eval.max_tokens_per_domain} "
            f"tokens per domain, windows of {c.eval.seq_len}"
        ],
    }


def _load_for_eval(path: Path) -> tuple:
    """(name, logits_fn, eval params, kind, config, params, meta) of one model directory."""
    kind, mc, params, meta = load_any(path)
    name = snapshot_name(path) or NICE.get(path.name, meta.get("label", path.name))
    if kind == "dense":
        fn, p = dense_logits_fn(mc.replace(scan_layers=False)), llama.unstack_layers(params)
        return name, fn, p, kind, mc, params, meta
    if mc.moe.layerwise:
        name = NICE.get(path.name, "layer-wise-router MoE")
    return name, readme_logits_fn(mc), params, kind, mc, params, meta


def run_eval(c, run: Path, checkpoints: list[Path] | None = None) -> dict[str, Any]:
    """Evaluate the dense teacher and every model in `run` into run/eval/ (JSON + report)."""
    t0 = time.time()
    cfg, dense, tok = models.load_dense(c.model.checkpoint, c.model.dtype, False, c.seed)
    domains = list(parse_domains(c.data.domains))
    extra = c.data.get("extra_domains", "") or ""
    domains += [d.partition("=")[0].strip() for d in extra.split(",") if d.strip()]
    domains = list(dict.fromkeys(domains))
    streams = {
        d: domain_stream(
            d,
            c.eval.split,
            tok,
            max_tokens=c.eval.max_tokens_per_domain,
            cache=c.data.cache or None,
        )
        for d in domains
    }
    kw = dict(max_length=c.eval.seq_len, stride=None, batch_size=c.eval.batch_size)
    teacher = (dense_logits_fn(cfg), llama.unstack_layers(dense))
    results: dict[str, Any] = {"meta": _meta(c), "models": {}}
    do_mmlu = c.eval.mmlu_limit > 0
    skip = tuple(s for s in str(c.eval.get("skip_models", "")).split(",") if s)
    paths = checkpoints if checkpoints is not None else discover(run, skip)
    loaded = [_load_for_eval(path) for path in paths]
    # one teacher forward per window batch, its log-probs reused for every model's KL
    students = {name: (fn, p) for name, fn, p, *_ in loaded}
    row, rows = evaluate_domains_many(teacher, students, streams, **kw)
    row.update(kind="dense", total_params=cfg.param_count(), active_params=cfg.param_count())
    if do_mmlu:
        row["mmlu"] = _mmlu(teacher[0], teacher[1], tok, cfg, c)
    results["models"]["dense teacher"] = row
    for path, (name, fn, p, kind, mc, params, meta) in zip(paths, loaded, strict=True):
        row = rows[name]
        row["kind"] = kind
        row["total_params"], row["active_params"] = _active_params(kind, mc, meta, params)
        if "expert_tokens" in meta:  # trained models and snapshots (train.snapshots)
            row["expert_tokens"] = meta["expert_tokens"]
        if do_mmlu:
            row["mmlu"] = _mmlu(fn, p, tok, cfg, c)
        results["models"][name] = row
        if kind == "readme_moe" and not mc.moe.layerwise:
            spec = Path(path) / "experts"
            experts = ExpertSpec.load(spec).domains if spec.exists() else domains
            results["routing"] = routing_analysis(mc, params, streams, experts, c.eval.seq_len)
        elif kind == "readme_moe":
            red = layerwise_analysis(mc, params, streams, c.eval.seq_len)
            results.setdefault("routing", {})["layerwise"] = red
    if c.eval.get("skills", True):
        t_gen = _greedy_fn("dense", with_end_ids(cfg, tok), dense)
        models_ = {}
        for name, fn, p, kind, mc, params, _ in loaded:
            mc = (
                with_end_ids(mc, tok)
                if kind == "dense"
                else mc.replace(model=with_end_ids(mc.model, tok))
            )
            models_[name] = (fn, p, _greedy_fn(kind, mc, params))
        t_skills = time.time()
        sk = _skills(c, tok, (*teacher, t_gen), models_, domains)
        for name, v in sk.items():
            if v:
                results["models"][name]["skills"] = v
        print(f"[eval] skills (chat fidelity, answer test) in {time.time() - t_skills:.0f}s")
    if (run / "metrics.jsonl").exists():
        results["training"] = {"metrics": str(run / "metrics.jsonl"), "keys": ["loss"]}
    serve = run / "serve" / "results.json"
    if serve.exists():
        s = json.loads(serve.read_text())
        results["serving"] = {k: s[k] for k in ("hit_ratio", "latency", "summary") if k in s}
    out = write_report(results, run / "eval")
    print(headline_table(results))
    print(f"[eval] {len(results['models'])} models in {time.time() - t0:.0f}s -> {out['report']}")
    return results
