"""Held-out quality of a refactored run before training, with and without reconstruction.

    python tools/reconstruct_quality.py --run runs/base [--tokens 4096] [--out FILE.json]
    python tools/reconstruct_quality.py --run runs/compare_rec \
        --model runs/compare_rec/moe_trained --only_run   # a trained model, same oracle routing

RUN must hold calib/ (statistics) and moe_init/ (the refactor stage; with
refactor.reconstruct=lstsq it also holds static_refit.npz). Each domain's validation tokens
are routed to that domain's own expert (the oracle of docs/logbook/refactoring.md §1). Models: the
dense teacher; Read-ME as refactored in RUN; Read-ME with plain channel selection (no refit);
static pruning (same active width) plain and with the saved refit. One teacher pass per batch
for all of them (eval.perplexity.perplexity_and_fidelity_many).
"""

import argparse
import dataclasses
import json
import math
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def _oracle_fn(rc):
    """Logits with every token on expert e; params = (Read-ME params, e as a 0-d int32 array),
    so one compiled function serves every domain."""
    import jax.numpy as jnp

    from readme_jax.model.readme import readme_forward

    def fn(params_e, tokens_BxS):
        params, e = params_e
        B, S = tokens_BxS.shape
        routing = (jnp.full((B, S, 1), e, jnp.int32), jnp.ones((B, S, 1), jnp.float32))
        return readme_forward(params, tokens_BxS, rc, routing=routing)[0]

    return fn


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--run", required=True)
    ap.add_argument("--tokens", type=int, default=4096)
    ap.add_argument("--seq_len", type=int, default=512)
    ap.add_argument("--batch_size", type=int, default=4)
    ap.add_argument("--out", default="")
    ap.add_argument("--only_run", action="store_true", help="only the run's moe_init (+ dense)")
    ap.add_argument("--model", default="", help="the Read-ME model to rate (default RUN/moe_init)")
    a = ap.parse_args()
    from readme_jax.checkpoints import models
    from readme_jax.eval.domains import domain_stream
    from readme_jax.eval.perplexity import dense_logits_fn, perplexity_and_fidelity_many
    from readme_jax.model import llama
    from readme_jax.refactor import pipeline as rp
    from readme_jax.refactor import reconstruct
    from readme_jax.refactor.experts import active_ffn_fraction, static_pruned_params
    from readme_jax.refactor.stats import ActivationStats

    t0 = time.time()
    run = Path(a.run)
    stats = ActivationStats.load(run / "calib")
    model = models.load_readme(a.model or run / "moe_init")
    rc = model.rc.replace(moe=dataclasses.replace(model.rc.moe, dispatch="blocked"))
    cfg, dense, tok = models.load_dense()
    plain, _ = rp.refactor(dense, cfg, stats, model.spec.remain_rate, rc.moe, rc.router)
    width = active_ffn_fraction(model.spec, cfg.ffn_dim, rc.moe.top_k)
    st, w = static_pruned_params(llama.stack_layers(dense), stats.mean_abs_ExLxF, width)
    st_fit = reconstruct.apply_static_refit(run / "moe_init", st)
    st_fn = dense_logits_fn(cfg.replace(ffn_dim=w))
    teacher = (dense_logits_fn(cfg), llama.unstack_layers(dense))
    rows: dict = {}
    fn = _oracle_fn(rc)
    for e, d in enumerate(model.spec.domains):
        toks, _ = domain_stream(d, "validation", tok, max_tokens=a.tokens)
        ea = np.asarray(e, np.int32)
        students = {
            "Read-ME (run's moe_init)": (fn, (model.params, ea)),
            "Read-ME plain": (fn, (plain, ea)),
            "static plain": (st_fn, llama.unstack_layers(st)),
        }
        if st_fit is not st:
            students["static refit"] = (st_fn, llama.unstack_layers(st_fit))
        if a.only_run:
            students = {k: v for k, v in students.items() if k.startswith("Read-ME (run")}
        t, res = perplexity_and_fidelity_many(
            *teacher, students, toks, max_length=a.seq_len, batch_size=a.batch_size, progress=d
        )
        rows.setdefault("dense", {})[d] = (t.nll_sum, t.n_tokens, 0.0)
        for k, (r, f) in res.items():
            rows.setdefault(k, {})[d] = (r.nll_sum, r.n_tokens, f.kl_sum)
    out = {
        "run": str(run),
        "tokens_per_domain": a.tokens,
        "seconds": time.time() - t0,
        "models": {},
    }
    for k, per in rows.items():
        nll = sum(v[0] for v in per.values())
        n = sum(v[1] for v in per.values())
        kl = sum(v[2] for v in per.values())
        out["models"][k] = {
            "ppl_all": math.exp(nll / n),
            "kl": kl / n,
            "per_domain": {d: math.exp(v[0] / v[1]) for d, v in per.items()},
        }
    dense_ppl = out["models"]["dense"]["ppl_all"]
    print(f"| model | ppl (all) | x dense | KL | {' | '.join(model.spec.domains)} |")
    for k, m in out["models"].items():
        doms = " | ".join(f"{v:.2f}" for v in m["per_domain"].values())
        ratio = m["ppl_all"] / dense_ppl
        print(f"| {k} | {m['ppl_all']:.2f} | {ratio:.2f}x | {m['kl']:.3f} | {doms} |")
    if a.out:
        Path(a.out).write_text(json.dumps(out, indent=2))
    print(f"[{time.time() - t0:.0f}s]")


if __name__ == "__main__":
    main()
