"""Measure refactoring quality before training (issue: Read-ME refactoring).

    python tools/refactor_quality.py [--run runs/smollm2_135m] [--tokens 8192] [--rates 0.5,0.75]

Uses RUN/calib statistics (run `launch/train.py --config.stages=calibrate` first) and the first
--tokens tokens of each domain's validation split; writes RUN/reports/refactor_quality.{json,md}.
"""

import argparse
from pathlib import Path

from readme_jax.checkpoints.models import load_dense
from readme_jax.data import load_tokens
from readme_jax.eval import refactor_quality as analysis
from readme_jax.refactor.stats import ActivationStats


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--run", default="runs/smollm2_135m")
    ap.add_argument("--tokens", type=int, default=8192)
    ap.add_argument("--rates", default="0.5,0.75")
    ap.add_argument("--split", default="validation")
    a = ap.parse_args()
    stats = ActivationStats.load(Path(a.run) / "calib")
    cfg, dense, tok = load_dense(stats.recipe.get("checkpoint", ""))  # "bundled:..." too
    toks = {d: load_tokens(d, a.split, tok)[: a.tokens].astype("int32") for d in stats.domains}
    q = analysis.refactor_quality(
        cfg, dense, stats, toks, tuple(float(r) for r in a.rates.split(","))
    )
    q["tokens_per_domain"] = a.tokens
    q["split"] = a.split
    analysis.save_quality(q, Path(a.run) / "reports")
    print(analysis.render_quality(q))


if __name__ == "__main__":
    main()
