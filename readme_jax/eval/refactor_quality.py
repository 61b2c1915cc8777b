"""How good is a refactoring before training? Held-out perplexity per domain for

  dense          the original model
  oracle         Read-ME experts, each domain routed to its own expert
  wrong          each domain routed to another domain's expert ((d + 1) mod E)
  static_pruned  a dense model with the same active FFN width (top channels averaged over domains)
  shared_only    the always-on shared expert alone

at one or more remain rates (`launch/train.py --config.stages=...` produces the statistics).
"""

from __future__ import annotations

import functools
import json
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from readme_jax.eval.perplexity import dense_logits_fn, perplexity
from readme_jax.model import llama, moe
from readme_jax.model.config import LlamaConfig, MoEConfig
from readme_jax.refactor.experts import (
    active_ffn_fraction,
    build_expert_spec,
    build_moe_params,
    static_pruned_params,
)
from readme_jax.refactor.stats import ActivationStats

VARIANTS = ("dense", "oracle", "wrong", "static_pruned", "shared_only")


@functools.cache
def fixed_route_logits_fn(cfg: LlamaConfig, num_experts: int):
    """logits_fn over {"backbone", "expert", "weight"}: every token to one expert (weight 0 =
    shared expert only). One compilation serves every domain and variant."""
    mcfg = MoEConfig(num_experts, dispatch="select")  # one expert per call: compute only it

    def fn(p, tokens_BxS):
        shape = tokens_BxS.shape + (1,)
        routing = (
            jnp.full(shape, p["expert"], jnp.int32),
            jnp.full(shape, p["weight"], jnp.float32),
        )
        return moe.moe_forward(p["backbone"], tokens_BxS, cfg, mcfg, routing)[0]

    return fn


def refactor_quality(
    cfg: LlamaConfig,
    dense: Any,
    stats: ActivationStats,
    eval_tokens: dict[str, np.ndarray],
    remain_rates: tuple[float, ...] = (0.5, 0.75),
    window: int = 512,
    batch_size: int = 4,
) -> dict[str, Any]:
    """{"dense": {domain: ppl}, "<rr>": {variant: {domain: ppl}}, "sizes": ...}."""
    E = len(stats.domains)
    idx = {d: i for i, d in enumerate(stats.domains)}
    dense_u = llama.unstack_layers(dense)

    def ppl(fn, params, toks, label):
        r = perplexity(fn, params, toks, max_length=window, batch_size=batch_size, progress=label)
        return r.ppl

    out: dict[str, Any] = {"domains": list(eval_tokens), "window": window}
    out["dense"] = {
        d: ppl(dense_logits_fn(cfg), dense_u, t, f"dense {d}") for d, t in eval_tokens.items()
    }
    for rr in remain_rates:
        spec = build_expert_spec(stats.mean_abs_ExLxF, rr, stats.domains)
        backbone = llama.unstack_layers(build_moe_params(llama.stack_layers(dense), spec))
        fn = fixed_route_logits_fn(cfg, E)
        res: dict[str, Any] = {v: {} for v in VARIANTS[1:]}
        pruned, width = static_pruned_params(llama.stack_layers(dense), stats.mean_abs_ExLxF, rr)
        pcfg = cfg.replace(ffn_dim=width)
        pruned = llama.unstack_layers(pruned)
        for d, toks in eval_tokens.items():
            e = idx[d]
            for name, ex, w in (
                ("oracle", e, 1.0),
                ("wrong", (e + 1) % E, 1.0),
                ("shared_only", e, 0.0),
            ):
                p = {"backbone": backbone, "expert": jnp.int32(ex), "weight": jnp.float32(w)}
                res[name][d] = ppl(fn, p, toks, f"rr={rr} {name} {d}")
            res["static_pruned"][d] = ppl(
                dense_logits_fn(pcfg), pruned, toks, f"rr={rr} pruned {d}"
            )
        res["shared_widths"] = spec.shared_widths.tolist()
        res["expert_widths"] = spec.expert_widths.tolist()
        res["active_ffn_fraction"] = active_ffn_fraction(spec, cfg.ffn_dim)
        res["static_width"] = width
        ffn_params = cfg.n_layers * 3 * cfg.dim * cfg.ffn_dim
        active = cfg.param_count() - ffn_params * (1 - res["active_ffn_fraction"])
        res["active_param_fraction"] = active / cfg.param_count()
        out[str(rr)] = res
        jax.clear_caches()
    return out


def render_quality(q: dict[str, Any]) -> str:
    doms = q["domains"]
    lines = []
    for rr in [k for k, v in q.items() if isinstance(v, dict) and "oracle" in v]:
        r = q[rr]
        sw = r["shared_widths"]
        lines += [
            f"#### Remain rate {rr}: active FFN fraction {r['active_ffn_fraction']:.3f}, active "
            f"parameters {r['active_param_fraction']:.1%} of dense; shared channels per layer "
            f"{min(sw)}-{max(sw)} (mean {np.mean(sw):.0f})",
            "",
            "| variant | " + " | ".join(doms) + " | mean ratio to dense |",
            "|---|" + "---|" * (len(doms) + 1),
            "| dense | " + " | ".join(f"{q['dense'][d]:.1f}" for d in doms) + " | 1.00 |",
        ]
        for v in VARIANTS[1:]:
            ratio = np.mean([r[v][d] / q["dense"][d] for d in doms])
            lines.append(
                f"| {v} | " + " | ".join(f"{r[v][d]:.1f}" for d in doms) + f" | {ratio:.2f} |"
            )
        lines.append("")
    return "\n".join(lines)


def save_quality(q: dict[str, Any], out_dir: str | Path) -> None:
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "refactor_quality.json").write_text(json.dumps(q, indent=2))
    (out / "refactor_quality.md").write_text(render_quality(q))
