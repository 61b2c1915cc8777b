"""Combine the evaluations of runs that differ in remain rate into one comparison: held-out
perplexity against active parameters, per-window paired intervals against the static pruned
model, training tokens and construction of each run.

  python launch/compare.py --config.runs="runs/compare_rr0.5 runs/compare_rr0.75" \
      --config.out=docs/compare

A run trained without its own static control (train.baselines=none) can borrow another run's
(same held-out windows and expert-phase tokens, checked): --config.control=RUN.
`make compare` trains and evaluates the runs first. Writes OUT/compare.json, OUT/compare.md and
OUT/ppl_vs_active.png (readme_jax/eval/compare.py). Settings: configs/compare.py.
"""

from __future__ import annotations

import shlex
import sys
from pathlib import Path

from readme_jax import cli
from readme_jax.eval.compare import load_run, write_comparison
from readme_jax.model.config import ConfigError

CONFIG = Path(__file__).resolve().parents[1] / "configs" / "compare.py"


def main(argv: list[str] | None = None) -> str:
    argv = sys.argv[1:] if argv is None else argv
    c = cli.parse_config(CONFIG, argv)
    runs = str(c.runs).replace(",", " ").split()
    if not runs:
        raise ConfigError('no runs: --config.runs="RUN_A RUN_B" (run directories)')
    command = shlex.join(["python", "launch/compare.py", *argv])
    text = write_comparison([load_run(r, c.control or None) for r in runs], c.out, command)
    print(text)
    return text


if __name__ == "__main__":
    cli.guarded(main)()
