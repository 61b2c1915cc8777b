"""Serving benchmark config (`launch/serve_bench.py`); override with --config.x=y.

  python launch/serve_bench.py --config configs/serve_bench.py --config.model=tiny
  python launch/serve_bench.py --config.checkpoint=runs/smollm2_135m/moe_trained --config.cv=3

Comma lists are strings ("belady,lru"); "lo,hi" pairs too. The old flag names (--model=tiny,
--out_dir=..., --sim_logs, --no_real_prefetch) still work: the script maps --x=y to --config.x=y.
"""

import importlib.util
import pathlib

from ml_collections import ConfigDict

# the engine block by path: config files are loaded by path, `configs` need not be importable
_spec = importlib.util.spec_from_file_location(
    "readme_jax_configs_engine", pathlib.Path(__file__).with_name("engine.py")
)
_engine = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(_engine)
get_engine = _engine.get_engine


def get_config() -> ConfigDict:
    c = ConfigDict()
    # model: "smollm2" = --checkpoint (a Read-ME run's model dir) or SmolLM2 refactored on the
    # fly; "tiny" = a random 2-layer model with random token prompts (smoke test, seconds)
    c.model = "smollm2"
    c.checkpoint = ""
    c.domains = "fiction,drama,code_docs,manual"  # experts (on the fly) and prompt sources
    c.calib_sequences = 4  # per domain, on-the-fly refactoring only
    c.calib_len = 256  # tokens per calibration sequence
    # trace
    c.trace = ""  # JSONL trace to replay instead of generating one
    c.num_requests = 8
    c.rate = 1.0  # arrivals per second of CPU time (0: all at once)
    c.cv = 1.0  # coefficient of variation of gaps: 1 Poisson, > 1 bursty (gamma)
    c.prompt_len = "16,32"  # lo,hi prompt tokens (uniform), cut from held-out documents
    c.output_len = "10,20"  # median,max new tokens (lognormal, sigma 0.6, at least 4)
    c.seed = 0
    # engine
    c.batching = "expert,cache,decode,prefill"
    c.policies = "belady,lru,lfu,random"
    c.capacities = ""  # C values; "" = 2 .. E-1
    c.real_grid = "cache"  # full: every batching x policy x C on the real engine; cache: the
    # policy x C grid with expert batching only (the others simulated)
    c.real_prefetch = True  # also Belady + prefetch on the real engine
    # the engine block (configs/engine.py); batching, cache_policy, capacity and prefetch are
    # set per run by the grid above
    c.engine = get_engine()
    c.engine.max_len = 128  # context per request slot (M)
    c.engine.max_batch_tokens = 32
    # simulation and output
    c.profiles = "a100,h200"
    c.scales = "served,llama2-7b"  # served: the model's own sizes; llama2-7b: the paper's scale
    c.sim_logs = False  # dump simulated runs' decision logs too
    c.out_dir = "runs/serve_bench"
    c.compile_cache = ""  # persistent XLA compilation cache dir (speeds up reruns)
    return c
