"""Locality sweep: router-only training at several `train.locality_weight`s (and optionally
several `train.domain_target`s: every pair is one point) from one refactored model, then
held-out perplexity against temporal locality, Belady hit ratio at C = E/2 and unique experts
per batch (one Pareto plot).

  python launch/locality_sweep.py --run RUN --weights 0,0.5,2 --out runs/locality_sweep
  python launch/locality_sweep.py --run RUN --weights 0,1 --domain_targets 0,1 --router_steps 12

RUN holds `calib/` and `moe_init/` (launch/train.py stages calibrate,refactor). Each point gets
RUN_sweep/w<w>/ (w<w>_d<domain target>/ for a nonzero domain target) with links to both and
runs the `train` stage with rounds=1,
router_steps=--router_steps, expert_steps=0 (the experts stay as refactored, so the perplexity
differences come from routing alone; the issue's recipe trains experts too: not done here).
Per point, on the validation split: perplexity of the routed MoE over the first
--eval_tokens tokens of each domain (windows of 512), temporal locality of the router over
the same tokens, and the decode-prioritized simulation of serve/bench/cachesim.py on a default
routed trace (Belady hit ratio at C = E/2, unique experts per batch).
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from launch.serve_sim import cost_7b, router_fn  # noqa: E402
from readme_jax.checkpoints import store  # noqa: E402
from readme_jax.checkpoints.tokenizer import load_tokenizer  # noqa: E402
from readme_jax.data import pipeline  # noqa: E402
from readme_jax.eval import routing as rt  # noqa: E402
from readme_jax.eval.pipeline import readme_logits_fn  # noqa: E402
from readme_jax.model.readme import ReadMEConfig  # noqa: E402
from readme_jax.refactor.experts import ExpertSpec  # noqa: E402
from readme_jax.serve.bench import cachesim as cs  # noqa: E402
from readme_jax.serve.bench import costmodel as cm  # noqa: E402

_RUN = flags.DEFINE_string("run", None, "Run directory with calib/ and moe_init/.")
_W = flags.DEFINE_list("weights", ["0", "0.5", "2"], "train.locality_weight values.")
_DT = flags.DEFINE_list(
    "domain_targets", ["0"], "train.domain_target values (router target towards the label)."
)
_STEPS = flags.DEFINE_integer("router_steps", 4, "Router steps per weight (1,024 tokens each).")
_TOK = flags.DEFINE_integer("eval_tokens", 1024, "Validation tokens per domain.")
_OUT = flags.DEFINE_string("out", "runs/locality_sweep", "Output prefix (.json, .png).")
_CONFIG = flags.DEFINE_string("config", "configs/smollm2_135m.py:eight", "Run config.")


def train_router(run: Path, w: str, dt: str = "0") -> Path:
    r = run.parent / f"{run.name}_sweep" / (f"w{w}" if float(dt) == 0 else f"w{w}_d{dt}")
    r.mkdir(parents=True, exist_ok=True)
    for sub in ("calib", "moe_init"):
        if not (r / sub).exists():
            (r / sub).symlink_to((run / sub).resolve())
    cmd = [
        sys.executable,
        "launch/train.py",
        f"--config={_CONFIG.value}",
        f"--config.run_dir={r}",
        "--config.stages=train",
        "--config.preset=demo",
        "--config.train.rounds=1",
        f"--config.train.router_steps={_STEPS.value}",
        "--config.train.expert_steps=0",
        "--config.train.baselines=none",
        f"--config.train.locality_weight={w}",
        f"--config.train.domain_target={dt}",
    ]
    subprocess.run(cmd, check=True)
    return r / "moe_trained"


def measure(ckpt: Path, streams, tok_streams, mc) -> dict:
    meta = store.read_meta(ckpt)
    rc, params = ReadMEConfig.from_dict(meta["config"]), store.load_params(ckpt)
    logits = jax.jit(readme_logits_fn(rc))
    route = router_fn(params, rc)
    nll = n = 0.0
    seqs = []
    for toks in tok_streams.values():
        x = np.asarray(toks[: _TOK.value], np.int32).reshape(-1, 512)
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


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    keys = [k for k in rows[0] if k.startswith(("temporal", "belady", "unique"))]
    fig, axes = plt.subplots(1, len(keys), figsize=(4 * len(keys), 3.4))
    targets = sorted({r["domain_target"] for r in rows})
    for ax, k in zip(axes, keys, strict=True):
        for dt in targets:  # one line per router target, points in order of the weight
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


def main(argv):
    del argv
    if not _RUN.value:
        raise app.UsageError("--run is required")
    run = Path(_RUN.value)
    if not (run / "moe_init").is_dir():
        print(
            f"error: {run}/moe_init is missing; run the calibrate,refactor stages first",
            file=sys.stderr,
        )
        return 2
    tok = load_tokenizer()
    domains = list(ExpertSpec.load(run / "moe_init" / "experts").domains)
    streams = {
        d: (pipeline.load_tokens(d, "validation", tok), pipeline.load_offsets(d, "validation", tok))
        for d in domains
    }
    tok_streams = {d: s[0] for d, s in streams.items()}
    rc = ReadMEConfig.from_dict(store.read_meta(run / "moe_init")["config"])
    mc = cost_7b(run / "moe_init", rc)
    rows = []
    for w, dt in [(w, dt) for dt in _DT.value for w in _W.value]:
        ckpt = train_router(run, w, dt)
        point = {"weight": float(w), "domain_target": float(dt), "checkpoint": str(ckpt)}
        rows.append(point | measure(ckpt, streams, tok_streams, mc))
        print(json.dumps(rows[-1]))
        out = Path(_OUT.value)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.with_suffix(".json").write_text(
            json.dumps({"command": " ".join(sys.argv), "rows": rows}, indent=1)
        )
    if len(rows) > 1:
        plot(rows, Path(_OUT.value).with_suffix(".png"))
    return 0


if __name__ == "__main__":
    app.run(main)
