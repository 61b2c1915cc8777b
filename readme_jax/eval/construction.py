"""The construction study: how good are experts built by each rule, against static pruning built
by the same rule, before training, with and without the least-squares refit?

For each token grouping (domain labels; k-means clusters of the tokens' activation patterns,
"kmeansE"; or k-means clusters of 128-token context chunks, "chunkE")
and each construction (refactor/construct.py), the experts are evaluated with *oracle* routing:
a domain's tokens on the domain's expert; a clustered token on the expert whose channels cover
most of its own top channels (Eq. 4's target, `refactor/targets.py`, computed from the dense
model in the same forward: the assignment the router is trained towards); a context-clustered
model routes each token by the same counts summed over its causal prefix (what a pre-gating
router, which sees the prefix, could follow; routes then change rarely). That is the ceiling a
pre-gating router can reach with these experts. The control of each construction is the static
model keeping the same number of channels per layer chosen by the same score over all tokens,
with the same refit (or none). Every model is scored on the same held-out windows; differences
to the control are per-window mean NLL differences with a paired bootstrap interval
(eval/paired.py).

  python launch/construction.py --config configs/smollm2_135m.py --out runs/construction

Shapes: E experts, L layers, F FFN width, N held-out windows, T tokens.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from readme_jax.checkpoints.models import ReadMEModel, load_readme
from readme_jax.eval.paired import paired_bootstrap
from readme_jax.eval.perplexity import dense_logits_fn, window_batches
from readme_jax.model import llama, moe
from readme_jax.model.config import LlamaConfig, MoEConfig, ReadMEConfig, RouterConfig
from readme_jax.model.readme import readme_forward
from readme_jax.model.spec import ExpertSpec
from readme_jax.refactor import reconstruct
from readme_jax.refactor.cluster import chunk_assign, cluster_assign, router_assign
from readme_jax.refactor.construct import (
    Construction,
    build_spec,
    coverage_experts,
    kept_channels,
    prefix_groups,
    refit_rows,
    static_channels,
)
from readme_jax.refactor.experts import active_ffn_fraction, build_moe_params, expert_channel_masks
from readme_jax.refactor.pipeline import StaticControl
from readme_jax.refactor.stats import GroupStats, group_stats
from readme_jax.refactor.targets import union_masks

LogitsFn = Callable[[Any, jax.Array], jax.Array]


@dataclasses.dataclass(frozen=True)
class StudyConfig:
    """groupings: "domain" and/or "kmeansE" (E clusters); constructions: Construction names
    parsed by `parse_construction`; refit: evaluate without and with the refit; window: tokens
    per held-out window (windows are disjoint)."""

    remain_rate: float = 0.5
    groupings: tuple[str, ...] = ("domain",)
    constructions: tuple[str, ...] = ("magnitude/intersection",)
    refit: tuple[bool, ...] = (False, True)
    ridge: float = 1e-2
    refit_sequences: int = 8
    window: int = 512
    batch_size: int = 4
    top_frac: float = 0.5  # Eq. 4's share of a token's channels (the router target's)
    chunk: int = 128  # tokens per context chunk of the "chunkE" grouping
    seed: int = 0
    router: str = ""  # a Read-ME model directory: its router defines the "router" grouping


def parse_construction(name: str) -> Construction:
    """ "magnitude/intersection" | "frequency/core0.5/partition" -> Construction (checked)."""
    parts = name.split("/")
    if len(parts) == 2 and parts[1] == "intersection":
        return Construction(parts[0], "intersection").check()
    if len(parts) == 3 and parts[1].startswith("core"):
        frac = float(parts[1][4:] or 0.5)
        return Construction(parts[0], "core", parts[2], frac).check()
    raise ValueError(f"construction {name!r}: expected SCORE/intersection or SCORE/coreF/RULE")


# ---------------------------------------------------------------- scoring on windows
@functools.cache
def _window_nll_fn(logits_fn: LogitsFn):
    @jax.jit
    def fn(params, tokens_BxS, mask_BxS):
        logits = logits_fn(params, tokens_BxS)[:, :-1].astype(jnp.float32)
        picked = jnp.take_along_axis(logits, tokens_BxS[:, 1:, None], axis=-1)[..., 0]
        nll = jax.nn.logsumexp(logits, axis=-1) - picked
        m = mask_BxS[:, 1:]
        return jnp.sum(jnp.where(m, nll, 0.0), axis=1), jnp.sum(m, axis=1)

    return fn


def window_nll(
    logits_fn: LogitsFn, params: Any, tokens_T: np.ndarray, window: int, batch_size: int = 4
) -> np.ndarray:
    """Mean NLL (nats/token) of each disjoint window of `window` tokens, [N] (windows as in
    eval/perplexity.py; a window's first token is unscored)."""
    fn = _window_nll_fn(logits_fn)
    out = []
    for toks, mask in window_batches(tokens_T, window, None, batch_size):
        s, c = fn(params, jnp.asarray(toks), jnp.asarray(mask))
        s, c = np.asarray(s), np.asarray(c)
        out += [a / b for a, b in zip(s, c, strict=True) if b > 0]
    return np.asarray(out)


@functools.cache
def label_route_logits_fn(cfg: LlamaConfig, num_experts: int) -> LogitsFn:
    """logits_fn over {"backbone", "expert"}: every token on one expert (a domain's own)."""
    mcfg = MoEConfig(num_experts, dispatch="select")

    def fn(p, tokens_BxS):
        shape = tokens_BxS.shape + (1,)
        routing = (jnp.full(shape, p["expert"], jnp.int32), jnp.ones(shape, jnp.float32))
        return moe.moe_forward(p["backbone"], tokens_BxS, cfg, mcfg, routing)[0]

    return fn


@functools.cache
def router_route_logits_fn(cfg: LlamaConfig, rcfg: RouterConfig, num_experts: int) -> LogitsFn:
    """logits_fn over {"router", "backbone"}: each token on its pre-gating router's top-1 expert
    (the router sees token ids only: no oracle)."""
    rc = ReadMEConfig(cfg, MoEConfig(num_experts, dispatch="ragged"), rcfg)
    return lambda p, tokens_BxS: readme_forward(p, tokens_BxS, rc)[0]


@functools.cache
def coverage_route_logits_fn(
    cfg: LlamaConfig, num_experts: int, top_frac: float, prefix: bool = False
) -> LogitsFn:
    """logits_fn over {"dense", "backbone", "union"}: each token on its `coverage_experts`
    expert (one dense forward then one MoE forward per batch)."""
    mcfg = MoEConfig(num_experts, dispatch="ragged")

    def fn(p, tokens_BxS):
        e = coverage_experts(p["dense"], tokens_BxS, p["union"], cfg, top_frac, prefix)[..., None]
        routing = (e, jnp.ones(e.shape, jnp.float32))
        return moe.moe_forward(p["backbone"], tokens_BxS, cfg, mcfg, routing)[0]

    return fn


# ---------------------------------------------------------------- building
def _first_rows(batches, groups, n):
    """The first n rows of each domain's batches (the refit's calibration subset)."""
    out_b, out_g = [], []
    for bs, gs in zip(batches, groups, strict=True):
        left = n
        for b, g in zip(bs, gs, strict=True):
            if left <= 0:
                break
            out_b.append(np.asarray(b)[:left])
            out_g.append(np.asarray(g)[:left])
            left -= len(out_b[-1])
    return out_b, out_g


@dataclasses.dataclass
class _Grouping:
    name: str
    names: list[str]  # expert names
    batches: list[list[np.ndarray]]  # per domain, its calibration batches
    groups: list[list[np.ndarray]]  # the same shape: each token's group
    stats: GroupStats
    by_label: bool  # True: evaluate a domain's tokens on its own expert
    prefix: bool = False  # oracle over the causal prefix (context clusters) instead of the token
    router: ReadMEModel | None = None  # route by this model's router (no oracle)


def _grouping(name, dense, cfg, domain_batches, c: StudyConfig) -> _Grouping:
    doms = list(domain_batches)
    batches = [domain_batches[d] for d in doms]
    rm = None
    if name == "domain":
        groups = [[np.full(np.shape(b), i) for b in bs] for i, bs in enumerate(batches)]
        names = doms
    elif name.startswith("kmeans"):
        E = int(name[len("kmeans") :])
        flat = [b for bs in batches for b in bs]
        assign = iter(cluster_assign(dense, cfg, flat, E, seed=c.seed))
        groups = [[next(assign) for _ in bs] for bs in batches]
        names = [f"cluster{j}" for j in range(E)]
    elif name.startswith("chunk"):
        E = int(name[len("chunk") :])
        flat = [b for bs in batches for b in bs]
        assign = iter(chunk_assign(dense, cfg, flat, E, chunk=c.chunk, seed=c.seed))
        groups = [[next(assign) for _ in bs] for bs in batches]
        names = [f"cluster{j}" for j in range(E)]
    elif name == "router":
        if not c.router:
            raise ValueError("grouping 'router' needs StudyConfig.router (a Read-ME model dir)")
        rm = load_readme(c.router)
        flat = [b for bs in batches for b in bs]
        assign = iter(router_assign(rm.params["router"], rm.rc.router, cfg, flat))
        groups = [[next(assign) for _ in bs] for bs in batches]
        names = [f"router{j}" for j in range(rm.rc.moe.num_experts)]
    else:
        raise ValueError(f"grouping {name!r}: expected 'domain', 'kmeansE', 'chunkE' or 'router'")
    flat_b = [b for bs in batches for b in bs]
    flat_g = [g for gs in groups for g in gs]
    obs = any(parse_construction(n).score == "obs" for n in c.constructions)
    st = group_stats(
        dense,
        cfg,
        flat_b,
        flat_g,
        len(names),
        desc=f"stats {name}",
        obs_ridge=c.ridge if obs else None,
    )
    return _Grouping(
        name, names, batches, groups, st, name == "domain", name.startswith("chunk"), rm
    )


def _static_model(dense, cfg, kept_LxK, refit_batches, c: StudyConfig):
    """The static control keeping kept_LxK channels (the recipe's `StaticControl`), refit on
    `refit_batches` unless None. Returns per-layer (unstacked) params."""
    w = None
    if refit_batches is not None:
        w = reconstruct.reconstruct_static(dense, cfg, kept_LxK, {"all": refit_batches}, c.ridge)
    return llama.unstack_layers(StaticControl(kept_LxK, w).params(dense)[0])


def _oracle(cfg, spec: ExpertSpec, dense_u, backbone_u, g: _Grouping, doms, c: StudyConfig):
    """(logits_fn, domain -> params) routing every held-out token by the grouping's oracle:
    its domain's expert (labels) or Eq. 4's argmax (clusters)."""
    E = spec.num_experts
    if g.router is not None:
        fn = router_route_logits_fn(cfg, g.router.rc.router, E)
        return fn, lambda d: {"router": g.router.params["router"], "backbone": backbone_u}
    if g.by_label:
        fn = label_route_logits_fn(cfg, E)
        return fn, lambda d: {"backbone": backbone_u, "expert": jnp.int32(doms.index(d))}
    sh, ex = expert_channel_masks(spec, cfg.ffn_dim)
    p = {"dense": dense_u, "backbone": backbone_u, "union": union_masks(sh, ex)}
    return coverage_route_logits_fn(cfg, E, c.top_frac, g.prefix), lambda d: p


# ---------------------------------------------------------------- the study
def run_study(
    cfg: LlamaConfig,
    dense: dict,
    domain_batches: dict[str, list[np.ndarray]],
    streams: dict[str, np.ndarray],
    c: StudyConfig,
    log: Callable[[str], None] = print,
    out: str | Path | None = None,
) -> dict[str, Any]:
    """Every (grouping, construction, refit) model and its static control on the held-out
    `streams` (domain -> tokens_T). Returns the JSON-ready result (see `render`); with `out`,
    also saved there after every model (an interrupted study keeps what it measured)."""
    t_start = time.time()
    doms = list(streams)
    dense_u = llama.unstack_layers(dense)
    F = cfg.ffn_dim
    k = kept_channels(c.remain_rate, F)

    def score(fn, params_for) -> dict[str, np.ndarray]:
        return {d: window_nll(fn, params_for(d), streams[d], c.window, c.batch_size) for d in doms}

    models: dict[str, dict[str, Any]] = {}

    def result() -> dict[str, Any]:
        res = {
            "config": dataclasses.asdict(c),
            "domains": doms,
            "tokens_per_domain": {d: int(len(streams[d])) for d in doms},
            "dense_ffn": F,
            "minutes": (time.time() - t_start) / 60,
            "models": models,
        }
        return with_intervals(res, c.seed)

    def add(name, per_domain, **info):
        allw = np.concatenate([per_domain[d] for d in doms])
        models[name] = {
            **info,
            "ppl": math.exp(float(allw.mean())),
            "ppl_per_domain": {d: math.exp(float(per_domain[d].mean())) for d in doms},
            "window_nll": allw.tolist(),
        }
        log(f"[construction] {name}: ppl {models[name]['ppl']:.2f} ({time.time() - t_start:.0f}s)")
        if out is not None:
            save(result(), out)

    add("dense", score(dense_logits_fn(cfg), lambda d: dense_u), kind="dense")
    stacked = llama.stack_layers(dense)
    controls: dict[tuple[str, bool], str] = {}
    for gname in c.groupings:
        g = _grouping(gname, dense, cfg, domain_batches, c)
        rb, rg = _first_rows(g.batches, g.groups, c.refit_sequences)
        if g.router is not None and f"model {c.router}" not in models:  # its own experts
            rm = g.router
            fn = router_route_logits_fn(cfg, rm.rc.router, rm.rc.moe.num_experts)
            p = {
                "router": rm.params["router"],
                "backbone": llama.unstack_layers(rm.params["backbone"]),
            }
            add(f"model {c.router}", score(fn, lambda d, p=p: p), kind="model", path=c.router)
        for cname in c.constructions:
            con = parse_construction(cname)
            for refit in c.refit:
                if (con.score, refit) not in controls:  # the static control of score and refit
                    kept = static_channels(g.stats, con.score, k)
                    spu = _static_model(dense, cfg, kept, rb if refit else None, c)
                    name = f"static {con.score}" + (" +refit" if refit else "")
                    fn = dense_logits_fn(cfg.replace(ffn_dim=k))
                    add(
                        name,
                        score(fn, lambda d, p=spu: p),
                        kind="static",
                        score=con.score,
                        refit=refit,
                        active_ffn_fraction=k / F,
                    )
                    controls[(con.score, refit)] = name
            spec = build_spec(g.stats, c.remain_rate, g.names, con)
            base = build_moe_params(stacked, spec)
            if g.by_label or g.router is not None:
                fit_groups = rg
            elif g.prefix:
                fit_groups = prefix_groups(dense, cfg, spec, rb, c.top_frac)
            else:
                fit_groups = reconstruct.target_expert_groups(dense, cfg, spec, rb, c.top_frac)
            for refit in c.refit:
                bb = base
                if refit:
                    parts = reconstruct.readme_parts(spec)
                    rows = reconstruct.sequential_refit(
                        dense, cfg, rb, fit_groups, parts, c.ridge, f"refit {gname} {cname}"
                    )
                    bb = refit_rows(base, spec, rows)
                fn, params_for = _oracle(cfg, spec, dense_u, llama.unstack_layers(bb), g, doms, c)
                name = f"{gname} {cname}" + (" +refit" if refit else "")
                add(
                    name,
                    score(fn, params_for),
                    kind="readme",
                    grouping=gname,
                    construction=cname,
                    refit=refit,
                    control=controls[(con.score, refit)],
                    num_experts=spec.num_experts,
                    active_ffn_fraction=active_ffn_fraction(spec, F),
                    shared_width_mean=float(spec.shared_widths.mean()),
                )
            jax.clear_caches()
    return result()


def with_intervals(res: dict[str, Any], seed: int = 0) -> dict[str, Any]:
    """Fill each Read-ME model's "vs_control": the perplexity ratio to its static control and
    the 95% paired bootstrap interval over the held-out windows."""
    models = res["models"]
    for m in models.values():
        if m.get("control"):
            d = np.asarray(m["window_nll"]) - np.asarray(models[m["control"]]["window_nll"])
            mean, lo, hi = paired_bootstrap(d, seed=seed)
            m["vs_control"] = {"ppl_ratio": math.exp(mean), "ci95": [math.exp(lo), math.exp(hi)]}
    return res


def merge(results: list[dict[str, Any]]) -> dict[str, Any]:
    """Studies run in parts (e.g. one grouping per process) as one result. Raises ValueError
    unless they scored the same held-out windows (same domains, tokens, window and dense NLLs)."""
    first = results[0]
    out = {**first, "models": {}, "minutes": sum(r["minutes"] for r in results)}
    for r in results:
        same = (r["domains"], r["tokens_per_domain"], r["config"]["window"]) == (
            first["domains"],
            first["tokens_per_domain"],
            first["config"]["window"],
        )
        dense = np.asarray(r["models"]["dense"]["window_nll"])
        if not same or not np.allclose(dense, first["models"]["dense"]["window_nll"], atol=1e-5):
            raise ValueError("studies scored different held-out windows: cannot merge")
        out["models"].update(r["models"])
    return with_intervals(out, first["config"]["seed"])


def render(res: dict[str, Any]) -> str:
    """The study as a markdown table: ppl, x dense, per domain, vs its control (paired 95%)."""
    doms = res["domains"]
    dense = res["models"]["dense"]["ppl"]
    lines = [
        f"# Construction study (remain rate {res['config']['remain_rate']}, oracle routing)",
        "",
        f"Held-out tokens per domain: {res['tokens_per_domain']}; windows of "
        f"{res['config']['window']}; {res['minutes']:.1f} min.",
        "",
        "| model | ppl | x dense | " + " | ".join(doms) + " | vs control (95% CI) |",
        "|---|---|---|" + "---|" * len(doms) + "---|",
    ]
    for name, m in res["models"].items():
        vs = m.get("vs_control")
        vs_s = (
            f"{vs['ppl_ratio'] - 1:+.1%} [{vs['ci95'][0] - 1:+.1%}, {vs['ci95'][1] - 1:+.1%}]"
            if vs
            else "–"
        )
        per = " | ".join(f"{m['ppl_per_domain'][d]:.2f}" for d in doms)
        lines.append(f"| {name} | {m['ppl']:.2f} | {m['ppl'] / dense:.2f}x | {per} | {vs_s} |")
    return "\n".join(lines) + "\n"


def save(res: dict[str, Any], out: str | Path) -> Path:
    """out/construction.json (with per-window NLLs) and out/construction.md."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "construction.json").write_text(json.dumps(res, indent=1))
    (out / "construction.md").write_text(render(res))
    return out
