"""Bytes-per-token benchmark config (`launch/bench_bytes.py`); override with --config.x=y.

  python launch/bench_bytes.py --config.modes=none,int8 --config.quality_tokens=0
  python launch/bench_bytes.py --config.readme_checkpoint=runs/smollm2_135m/moe_trained

Comma lists are strings. Fields: readme_jax/eval/bytes_bench.py BytesBenchConfig.
"""

from ml_collections import ConfigDict


def get_config() -> ConfigDict:
    c = ConfigDict()
    c.modes = "none,int8,bf16,int8_act,int8_qwix"  # model/quant.py forms; f32 ("none") first
    c.batches = "1,8"
    c.steps = 30  # decode steps timed per round
    c.rounds = 2  # alternating rounds over the forms, best of each
    c.readme_checkpoint = ""  # a Read-ME model directory; "" = dense only
    c.domain = "fiction"  # held-out tokens for perplexity and KL (launch/data.py prepares it)
    c.quality_tokens = 2048  # 0 skips the quality rows
    # the offload engine with a Read-ME checkpoint: C of E experts on device, f32 vs low-bit
    c.offload_capacity = 2  # 0 skips it
    c.offload_requests = 8
    c.offload_prompt_len = 48
    c.offload_new_tokens = 32
    c.offload_text = "heldout"  # held-out windows of `domain`, or "synthetic"
    c.out = ""  # a markdown file to put the table into (docs/benchmarks.md); "" = print only
    c.json = ""  # a file for the raw results
    return c
