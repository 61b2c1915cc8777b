"""Speed benchmarks, measured side by side in one run; writes their table into docs/benchmarks.md.

  python launch/bench.py                                   # make bench
  python launch/bench.py --config.moe_checkpoint=RUN/moe_trained --config.peer=False

Dense SmolLM2 f32: ours vs Hugging Face transformers / PyTorch (run by the peer venv on the same
weights); Read-ME vs dense in one process; the batch-1 decode step on all cores and on one; the
serving engine vs the static-batch Generator (readme_jax/eval/speed.py,
readme_jax/serve/bench/profile.py). Settings: configs/bench.py. `READMEJAX_PEER_PYTHON` names
another peer Python.
"""

from __future__ import annotations

import functools
import os
import sys
from pathlib import Path

from readme_jax import cli
from readme_jax.checkpoints import models
from readme_jax.checkpoints.gguf import load_gguf
from readme_jax.checkpoints.tokenizer import load_tokenizer
from readme_jax.eval import speed
from readme_jax.serve.bench.profile import bench_engine

ROOT = Path(__file__).resolve().parents[1]
CONFIG = ROOT / "configs" / "bench.py"


def main(argv: list[str] | None = None) -> dict:
    argv = sys.argv[1:] if argv is None else argv
    c = cli.parse_config(CONFIG, argv)
    cfg, params = load_gguf()
    py = os.environ.get("READMEJAX_PEER_PYTHON", str(ROOT / c.peer_python))
    peer = functools.partial(speed.run_peer, python=py, script=ROOT / c.peer_script)
    dense = speed.bench_dense(cfg, params, peer if c.peer else None, c.rounds)
    print(speed.as_json(dense))
    moe = None
    if c.moe:
        if c.moe_checkpoint:
            m = models.load_readme(c.moe_checkpoint)
            rc, mp, spec, source = m.rc, m.params, m.spec, c.moe_checkpoint
        else:
            rc, mp, spec = speed.quick_moe(cfg, params, load_tokenizer())
            source = "quick calibration (4 x 256 tokens/domain), untrained router"
        moe = speed.bench_moe(cfg, params, rc, mp, spec, dense) | {"source": source}
        moe["engine"] = bench_engine(rc, mp)
        moe["ablation"] = speed.ablations(rc, mp, spec, c.moe_checkpoint or None)
        print(speed.as_json(moe))
    cmd = "make bench" if not argv else "python launch/bench.py " + " ".join(argv)
    section = speed.render(dense, moe, cmd)
    speed.write_section(c.out, section)
    Path(c.out).with_suffix(".json").write_text(speed.as_json({"dense": dense, "moe": moe}))
    print(section)
    return {"dense": dense, "moe": moe}


if __name__ == "__main__":
    cli.guarded(main)()
