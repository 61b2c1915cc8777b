"""One point of a locality sweep: a routed Read-ME's held-out perplexity against the temporal
locality of its router, the Belady hit ratio at C = E/2 and the unique experts per batch of a
decode-prioritized simulation; and the Pareto plot of several points.

  point = measure_point("RUN_sweep/w0.5/moe_trained", streams, mc, eval_tokens=1024)
"""

from __future__ import annotations

from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from readme_jax.checkpoints import models
from readme_jax.eval import routing as rt
from readme_jax.eval.pipeline import readme_logits_fn
from readme_jax.serve.bench import cachesim as cs
from readme_jax.serve.bench import costmodel as cm
from readme_jax.serve.bench.sim import router_fn

WINDOW = 512  # tokens per perplexity window


def measure_point(checkpoint: str | Path, streams: dict, mc: cm.ModelCost, eval_tokens: int):
    """{"perplexity", "eval_tokens", "temporal_locality", "belady_hit_C<E/2>",
    "unique_experts_per_batch"} of the Read-ME at `checkpoint` on `streams` (domain -> (tokens,
    offsets) of the validation split; the first `eval_tokens` of each, a multiple of WINDOW, are
    scored and routed) and a default routed trace of 60 requests simulated on `mc`."""
    m = models.load_readme(checkpoint)
    rc, params = m.rc, m.params
    logits = jax.jit(readme_logits_fn(rc))
    route = router_fn(params, rc)
    nll = n = 0.0
    seqs = []
    for toks, _ in streams.values():
        x = np.asarray(toks[:eval_tokens], np.int32).reshape(-1, WINDOW)
        lp = jax.nn.log_softmax(logits(params, jnp.asarray(x[:, :-1])), -1)
        nll += -float(jnp.take_along_axis(lp, jnp.asarray(x[:, 1:, None]), -1).sum())
        n += x[:, 1:].size
        seqs += [route(row) for row in x]
    E = rc.moe.num_experts
    reqs = cs.routed_requests(
        route, streams, 60, 4.0, (32, 128), "default", np.random.default_rng(0)
    )
    sim = cs.simulate(
        reqs,
        cs.SimConfig("decode", "online_belady", E // 2, E),
        cm.CostClock(cm.a100_pcie4(mc.layers), mc, pipelined=False),
    )
    hits = cs.hit_ratios(sim["trace"], ["belady"], [E // 2], E)
    return {
        "perplexity": float(np.exp(nll / n)),
        "eval_tokens": int(n),
        "temporal_locality": rt.temporal_locality(seqs).keep_fraction,
        f"belady_hit_C{E // 2}": hits["belady"][E // 2],
        "unique_experts_per_batch": sim["mean_unique_experts"],
    }


def plot(rows: list[dict], path: str | Path) -> None:
    """Perplexity against each measure of `measure_point`, one line per domain target, points
    in order of the locality weight (rows carry "weight" and "domain_target")."""
    from matplotlib.figure import Figure  # no pyplot: Agg canvas, no global backend state

    keys = [k for k in rows[0] if k.startswith(("temporal", "belady", "unique"))]
    fig = Figure(figsize=(4 * len(keys), 3.4))
    axes = fig.subplots(1, len(keys), squeeze=False)[0]
    targets = sorted({r["domain_target"] for r in rows})
    for ax, k in zip(axes, keys, strict=True):
        for dt in targets:
            rs = sorted((r for r in rows if r["domain_target"] == dt), key=lambda r: r["weight"])
            label = "Eq. 4 target" if not dt else f"label target {dt:g}"
            ax.plot([r[k] for r in rs], [r["perplexity"] for r in rs], "o-", label=label)
            for r in rs:
                ax.annotate(f"w={r['weight']:g}", (r[k], r["perplexity"]), fontsize=8)
        ax.set_xlabel(k.replace("_", " "))
        ax.set_ylabel("held-out perplexity")
    axes[0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
