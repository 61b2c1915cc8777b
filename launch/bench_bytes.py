"""Bytes per token: decode speed, bytes read and quality of the low-bit weight forms (int8,
bf16; model/quant.py) against f32, measured side by side in one run.

  python launch/bench_bytes.py                                  # dense SmolLM2, every form
  python launch/bench_bytes.py --config.readme_checkpoint=runs/smollm2_135m/moe_trained
  python launch/bench_bytes.py --config.modes=none,int8 --config.quality_tokens=0  # speed only
  # with a Read-ME checkpoint, also expert bytes moved per token by the offload engine at C=2
  make bench-bytes                                              # writes docs/benchmarks.md

Settings: configs/bench_bytes.py. The library: readme_jax/eval/bytes_bench.py.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from readme_jax import cli
from readme_jax.checkpoints import models
from readme_jax.eval import bytes_bench
from readme_jax.serve.bench import offload
from readme_jax.serve.decode import split_params

CONFIG = Path(__file__).resolve().parents[1] / "configs" / "bench_bytes.py"


def main(argv: list[str] | None = None) -> dict:
    argv = sys.argv[1:] if argv is None else argv
    c = cli.parse_config(CONFIG, argv)
    bc = bytes_bench.BytesBenchConfig(
        modes=cli.csv(c.modes),
        batches=cli.ints(c.batches),
        steps=c.steps,
        rounds=c.rounds,
        readme_checkpoint=c.readme_checkpoint,
        domain=c.domain,
        quality_tokens=c.quality_tokens,
    )
    m = models.load_readme(c.readme_checkpoint) if c.readme_checkpoint else None
    res = bytes_bench.run(bc, readme_source=None if m is None else (m.rc, m.params))
    extra = []
    if m is not None and c.offload_capacity:
        V = m.rc.model.vocab_size
        prompts = offload.offload_prompts(
            c.offload_requests, c.offload_prompt_len, c.offload_text, c.domain, None, V
        )
        modes = [q for q in bc.modes if q in ("none", "int8", "bf16")]
        sp = split_params(m.rc, m.params)
        res["offload"] = offload.offload_bytes(
            sp, prompts, c.offload_new_tokens, capacity=c.offload_capacity, modes=modes
        ) | {"prompts": f"{c.offload_text} ({c.domain})"}
        extra = offload.render_offload(res["offload"])
    section = bytes_bench.render(res, "python launch/bench_bytes.py " + " ".join(argv), extra)
    print(section)
    if c.out:
        bytes_bench.write_section(c.out, section)
    if c.json:
        Path(c.json).write_text(json.dumps(res, indent=1))
    return res


if __name__ == "__main__":
    cli.guarded(main)()
