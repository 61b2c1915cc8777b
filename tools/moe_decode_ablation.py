"""Where does the batch-1 MoE decode step spend its time? Times jitted decode steps side by side.

    python tools/moe_decode_ablation.py --checkpoint runs/compare_rr0.5/moe_trained [--rounds 4]

Variants (batch 1, 128-slot per-layer KV cache, greedy, one jitted step with a donated cache):
  dense          the dense SmolLM2 step
  dense_narrow   the dense step with every FFN cut to the MoE's mean active width (shared + one
                 expert): the time the MoE's bytes predict, with no routing at all
  moe            the Read-ME decode step (router + select dispatch), as served: one switch per
                 layer over E FFNs that each hold the shared and one expert's channels
  moe_unfused    the same with the shared expert and the routed expert as two FFNs
  moe_fixed      the served MoE backbone with the expert given as an input (no router)
  moe_step_switch  one lax.switch per step over E whole-backbone branches (instead of one per layer)
  router         the router step alone
Each round times every variant in turn (median of --steps calls); prints the median and the best
round per variant and writes them as JSON with --out. The machine is shared: compare best rounds.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from readme_jax.checkpoints import models  # noqa: E402
from readme_jax.decode.steps import dense_model, readme_model  # noqa: E402
from readme_jax.model import llama, moe  # noqa: E402
from readme_jax.model.router import init_router_cache, router_logits  # noqa: E402


def timed(step, params, cache, tok, n):
    """Median seconds per call of step(params, cache, tok) -> (tok, cache)."""
    for _ in range(3):
        tok, cache = step(params, cache, tok)
    jax.block_until_ready(tok)
    ts = []
    for _ in range(n):
        t = time.perf_counter()
        tok, cache = step(params, cache, tok)
        jax.block_until_ready(tok)
        ts.append(time.perf_counter() - t)
    return float(np.median(ts)), cache, tok


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--checkpoint", required=True, help="a Read-ME MoE checkpoint directory")
    ap.add_argument("--rounds", type=int, default=4)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--variants", default="dense,dense_narrow,moe,moe_unfused,moe_fixed,router")
    ap.add_argument("--cache_len", type=int, default=128)
    ap.add_argument("--out", default=None)
    a = ap.parse_args()

    m = models.load_readme(a.checkpoint)
    rc, spec = m.rc, m.spec
    cfg = rc.model
    dense = models.load_dense(scan_layers=False)[1]
    M = a.cache_len
    variants = {}

    width = int(round(float(spec.shared_widths.mean() + spec.expert_widths.mean())))

    def greedy(logits):
        return jnp.argmax(logits[:, -1], -1).astype(jnp.int32)

    dm = dense_model(cfg)
    dp = llama.unstack_layers(dense)

    def dstep(p, c, tok):
        lg, c = dm.step(p, tok[:, None], c, None)
        return greedy(lg), c

    variants["dense"] = (dstep, dp, lambda: dm.new_cache(1, M))
    narrow = {
        **dp,
        "layers": [
            {
                **lp,
                "w_gate_up": jnp.array(lp["w_gate_up"][..., :width]),
                "w_down": jnp.array(lp["w_down"][:width]),
            }
            for lp in dp["layers"]
        ],
    }
    variants["dense_narrow"] = (dstep, narrow, lambda: dm.new_cache(1, M))

    rm = readme_model(rc)
    rp = rm.prepare(m.params)

    def mstep(p, c, tok):
        lg, c = rm.step(p, tok[:, None], c, None)
        return greedy(lg), c

    variants["moe"] = (mstep, rp, lambda: rm.new_cache(1, M))
    mcfg = dataclasses.replace(rc.moe, dispatch=moe.pick_dispatch(None, "decode"))

    def fstep(p, c, tok):
        e = (c["expert"][:, None, None], jnp.ones((1, 1, 1), jnp.float32))
        lg, bc, _ = moe.moe_forward(p, tok[:, None], cfg, mcfg, e, cache=c["kv"])
        return greedy(lg), {"kv": bc, "expert": (c["expert"] + tok) % mcfg.num_experts}

    variants["moe_fixed"] = (
        fstep,
        rp["backbone"],
        lambda: {
            "kv": llama.init_cache(cfg, 1, M, per_layer=True),
            "expert": jnp.zeros((1,), jnp.int32),
        },
    )

    unfused = {
        "backbone": moe.unstack_experts(m.params["backbone"], trim=True),
        "router": rp["router"],
    }
    variants["moe_unfused"] = (mstep, unfused, lambda: rm.new_cache(1, M))

    def wstep(p, c, tok):  # one switch per step over E whole-backbone branches
        rlog, rcache = router_logits(p["router"], tok[:, None], rc.router, cfg, cache=c["router"])
        e = jnp.argmax(rlog[0, -1]).astype(jnp.int32)
        bb = p["backbone"]

        def branch(i):
            def ffn(lp, x, layer):
                B, S, D = x.shape
                y = moe._swiglu(x.reshape(B * S, D), lp["fused_gate_up"][i], lp["fused_down"][i])
                return y.reshape(B, S, D), None

            return lambda kv: llama.forward(bb, tok[:, None], cfg, cache=kv, ffn=ffn)[:2]

        lg, kv = jax.lax.switch(e, [branch(i) for i in range(mcfg.num_experts)], c["backbone"])
        return greedy(lg), {"backbone": kv, "router": rcache}

    variants["moe_step_switch"] = (wstep, rp, lambda: rm.new_cache(1, M))

    def rstep(p, c, tok):
        lg, c = router_logits(p, tok[:, None], rc.router, cfg, cache=c)
        return (tok + jnp.argmax(lg[:, -1], -1).astype(jnp.int32)) % 1000, c

    variants["router"] = (
        rstep,
        rp["router"],
        lambda: init_router_cache(rc.router, cfg, 1, M, per_layer=True),
    )
    names = [v for v in a.variants.split(",") if v in variants]
    jitted = {k: jax.jit(variants[k][0], donate_argnums=(1,)) for k in names}
    res = {k: [] for k in names}
    for r in range(a.rounds):
        for k in names:
            _, params, new_cache = variants[k]
            t, _, _ = timed(jitted[k], params, new_cache(), jnp.array([1000], jnp.int32), a.steps)
            res[k].append(t * 1e3)
        print(f"round {r}: " + ", ".join(f"{k} {res[k][-1]:.1f}" for k in names), flush=True)
    summary = {k: float(np.median(v)) for k, v in res.items()}
    best = {k: float(np.min(v)) for k, v in res.items()}
    print("median over rounds, ms/step:", json.dumps({k: round(v, 1) for k, v in summary.items()}))
    print("best round, ms/step:", json.dumps({k: round(v, 1) for k, v in best.items()}))
    print("active FFN width (mean shared + expert):", width, "of", cfg.ffn_dim)
    if a.out:
        Path(a.out).write_text(
            json.dumps(
                {"rounds": res, "median_ms": summary, "best_ms": best, "width": width}, indent=1
            )
        )


if __name__ == "__main__":
    main()
