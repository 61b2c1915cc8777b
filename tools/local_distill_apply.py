"""Apply layer-local distillation to an existing refactored model (an ablation).

    python tools/local_distill_apply.py --src runs/rec/moe_init --dst runs/rec_ld/moe_init \
        --steps 200 [--tokens 2048] [--batch 256] [--lr 1e-4]

The same as `--config.refactor.local_steps=N` in the refactor stage, but starting from a saved
moe_init (so the refit is not recomputed). Calibration rows: the train split, 16 x 512 tokens
per domain, seed 0 (the defaults of configs/smollm2_135m.py). Prints wall and CPU seconds.
"""

import argparse
import shutil
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--src", required=True)
    ap.add_argument("--dst", required=True)
    ap.add_argument("--steps", type=int, default=200)
    ap.add_argument("--tokens", type=int, default=2048)
    ap.add_argument("--batch", type=int, default=256)
    ap.add_argument("--lr", type=float, default=1e-4)
    a = ap.parse_args()
    from readme_jax.checkpoints import models
    from readme_jax.refactor import pipeline as rp
    from readme_jax.refactor.reconstruct import STATIC_REFIT_FILE
    from readme_jax.train import local_distill as ld

    t0, c0 = time.time(), time.process_time()
    model = models.load_readme(a.src)
    cfg, dense, tok = models.load_dense()
    domains = {d: None for d in model.spec.domains}
    batches = rp.calibration_batches(domains, tok, 16, 512)
    lc = ld.LocalDistillConfig(a.steps, a.tokens, a.batch, a.lr)
    params = ld.at_refactor(lc, dense, cfg, model.params, model.spec.domains, batches)
    meta = {k: v for k, v in model.meta.items() if k in ("recipe",)}
    meta["local_distill"] = vars(a)
    models.save_readme(a.dst, params, model.rc, model.spec, meta)
    if (Path(a.src) / STATIC_REFIT_FILE).exists():
        shutil.copy(Path(a.src) / STATIC_REFIT_FILE, Path(a.dst) / STATIC_REFIT_FILE)
    print(f"[local distill] wall {time.time() - t0:.0f}s, CPU {time.process_time() - c0:.0f}s")


if __name__ == "__main__":
    main()
