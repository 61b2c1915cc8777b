"""The serving engine's settings, one block (`readme_jax.serve.engine.EngineConfig.from_config`).

configs/serve.py and configs/serve_bench.py include it as `c.engine`:
  python launch/serve.py --config.engine.capacity=4 --config.engine.num_slots=16
"""

from ml_collections import ConfigDict


def get_engine() -> ConfigDict:
    e = ConfigDict()
    e.batching = "expert"  # expert | cache (cache-aware expert batching) | decode | prefill
    e.cache_policy = "belady"  # belady | lru | lfu | random (all experts resident: capacity 0)
    e.capacity = 0  # C expert slots on the device; 0 = all E resident (no expert cache)
    e.prefetch = True  # plan the next step's expert loads while this one runs (C < E only)
    e.num_slots = 8  # N request slots
    e.max_len = 1024  # context per request: prompt + max new tokens
    e.prefill_chunk = 32  # Q: prompt tokens per prefill call
    e.max_batch_tokens = 128  # token budget per step (prefill tokens + decode rows)
    e.max_wait = 32  # fairness bound in steps
    # expert cap of expert/cache batching: a batch adds no new expert once it needs this many
    # (0 = off, Algorithm 1 as in the paper; serve.batching module doc)
    e.max_experts = 0
    # all experts resident and nothing waiting: dispatch the next decode step before reading
    # this one (outputs are the same either way)
    e.lookahead = True
    e.seed = 0  # the random cache policy's seed
    return e
