"""Serving simulation config (`launch/serve_sim.py`): cache and batching policies on routed
traces of a trained Read-ME.

  python launch/serve_sim.py --config.checkpoint=RUN/moe_trained --config.expert_caps=2,3,4
"""

from ml_collections import ConfigDict


def get_config() -> ConfigDict:
    c = ConfigDict()
    c.checkpoint = ""  # a Read-ME model directory (e.g. RUN/moe_trained); required
    c.out_dir = "runs/serve_sim"  # <trace>.json, <trace>.md, logs/*.jsonl
    c.num_requests = 120  # per trace
    c.rate = 4.0  # Poisson arrivals per simulated second
    c.prompt_len = "32,128"  # lo,hi prompt tokens (uniform)
    c.seed = 0
    c.cache = ""  # data cache directory ("" = the default)
    c.capacities = "2,3,4,5,6"  # cache slots C of the hit-ratio tables (those < E)
    c.expert_caps = ""  # expert caps of expert/cache batching at C = E/2 ("" = C)
    return c
