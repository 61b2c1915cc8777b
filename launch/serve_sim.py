"""Cache and batching policies on routed traces of a trained Read-ME (no model in the loop).

  python launch/serve_sim.py --config.checkpoint=RUN/moe_trained --config.out_dir=runs/serve_sim

The checkpoint's router routes held-out text of its domains into two request traces; hit
ratios of every cache policy and the batching policies on a simulated A100 at Llama-2-7B scale
(readme_jax/serve/bench/sim.py). Writes OUT/<trace>.json, OUT/<trace>.md and OUT/logs/*.jsonl.
Settings: configs/serve_sim.py (the old `--checkpoint X` style still works).
"""

from __future__ import annotations

import shlex
import sys
from pathlib import Path

from readme_jax import cli
from readme_jax.model.config import ConfigError
from readme_jax.serve.bench.sim import SimSettings, simulate_checkpoint

CONFIG = Path(__file__).resolve().parents[1] / "configs" / "serve_sim.py"


def main(argv: list[str] | None = None) -> dict:
    argv = sys.argv[1:] if argv is None else argv
    c = cli.parse_config(CONFIG, argv)
    if not c.checkpoint:
        raise ConfigError("--config.checkpoint is required (a Read-ME model directory)")
    settings = SimSettings(
        num_requests=c.num_requests,
        rate=c.rate,
        prompt_len=cli.ints(c.prompt_len),
        seed=c.seed,
        cache=c.cache or None,
        capacities=cli.ints(c.capacities),
        expert_caps=cli.ints(c.expert_caps),
    )
    command = shlex.join(["python", "launch/serve_sim.py", *argv])
    return simulate_checkpoint(c.checkpoint, c.out_dir, settings, command)


if __name__ == "__main__":
    cli.guarded(main)()
