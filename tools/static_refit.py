"""Compute only the static baseline's refit, e.g. in a process of its own.

    python tools/static_refit.py --calib runs/base/calib --out runs/x/moe_init \
        [--remain_rate 0.5] [--ridge 1e-2] [--sequences 8]

Writes OUT/static_refit.npz, which the trainer's static baseline picks up from RUN/moe_init
(`reconstruct.apply_static_refit`). Same width rule as the refactor stage: the Read-ME active
FFN fraction of the experts built from the same statistics at the same remain rate (top-1).
Calibration rows: train split, 16 x 512 per domain, seed 0 (the config defaults); the first
--sequences of them are used.
"""

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--calib", required=True)
    ap.add_argument("--out", required=True)
    ap.add_argument("--remain_rate", type=float, default=0.5)
    ap.add_argument("--ridge", type=float, default=1e-2)
    ap.add_argument("--sequences", type=int, default=8)
    a = ap.parse_args()
    from readme_jax.checkpoints import models
    from readme_jax.refactor import pipeline as rp
    from readme_jax.refactor import reconstruct as rec
    from readme_jax.refactor.experts import active_ffn_fraction, build_expert_spec
    from readme_jax.refactor.stats import ActivationStats

    t0 = time.time()
    stats = ActivationStats.load(a.calib)
    spec = build_expert_spec(stats.mean_abs_ExLxF, a.remain_rate, stats.domains)
    cfg, dense, tok = models.load_dense()
    batches = rp.calibration_batches({d: None for d in stats.domains}, tok, 16, 512)
    batches = {d: rec._first_rows(bs, a.sequences) for d, bs in batches.items()}
    kept = rec.static_kept(stats.mean_abs_ExLxF, active_ffn_fraction(spec, cfg.ffn_dim))
    w = rec.reconstruct_static(dense, cfg, kept, batches, a.ridge)
    Path(a.out).mkdir(parents=True, exist_ok=True)
    rec.save_static_refit(a.out, kept, w)
    print(f"[static refit] {kept.shape[1]} channels per layer -> {a.out} ({time.time() - t0:.0f}s)")


if __name__ == "__main__":
    main()
