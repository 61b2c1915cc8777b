"""Where a serving engine's time goes at saturation: Read-ME vs the dense model, same engine.

  python launch/engine_profile.py --config.checkpoint=runs/smollm2_135m --config.num_requests=48
  python launch/engine_profile.py --config.checkpoint=RUN --config.rounds=0 --config.components=True

Every request arrives at t = 0; reports completion tokens per second of wall time per engine
configuration (best of --config.rounds alternating rounds) and the time per kind of step
(readme_jax/serve/bench/profile.py); `components` times the FFN alone. Settings:
configs/engine_profile.py and its engine block configs/engine.py.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from readme_jax import cli
from readme_jax.checkpoints import models
from readme_jax.errors import UserError
from readme_jax.serve.bench import profile
from readme_jax.serve.config import EngineConfig
from readme_jax.served import load_served

CONFIG = Path(__file__).resolve().parents[1] / "configs" / "engine_profile.py"


def main(argv: list[str] | None = None) -> dict:
    argv = sys.argv[1:] if argv is None else argv
    c = cli.parse_config(CONFIG, argv)
    rm = load_served(c.checkpoint or None)
    if rm.params.num_experts < 2:
        raise UserError(f"{c.checkpoint or 'the default model'} holds no Read-ME model")
    dense = load_served("", dense=True)
    out: dict = {"config": c.to_dict(), "model": rm.source, "results": {}}
    if c.rounds:
        reqs = profile.saturation_requests(
            rm.tokenizer, c.num_requests, cli.ints(c.prompt_len), cli.ints(c.output_len)
        )
        base = EngineConfig.from_config(c.engine)
        best = profile.run_engines(
            base, cli.csv(c.batching), reqs, rm.params, dense.params, c.rounds
        )
        for name, res in best.items():
            print(f"\n{name}: {res['tok_s']:.2f} tok/s = {res['vs_dense']:.2f}x dense")
            for k, v in res["by_kind"].items():
                print(
                    f"  {k:24s} {v['steps']:4d} steps  {v['total_s']:7.2f} s  "
                    f"median {1e3 * v['median_s']:6.1f} ms  rows {v['mean_decode_rows']:.1f}"
                )
        out["results"] = best
    if c.components:
        out["ffn_ms"] = profile.ffn_components(rm.params, models.load_dense("", seed=0)[1])
        for key, ms in out["ffn_ms"].items():
            print(f"[ffn] {key:22s} {ms:6.1f} ms")
    if c.out:
        Path(c.out).write_text(json.dumps(out, indent=2))
    return out


if __name__ == "__main__":
    cli.guarded(main)()
