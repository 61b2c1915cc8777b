"""Locality sweep config (`launch/locality_sweep.py`): router-only training at several
locality weights (and domain targets) from one refactored run.

  python launch/locality_sweep.py --config.run=RUN --config.weights=0,0.5,2
"""

from ml_collections import ConfigDict


def get_config() -> ConfigDict:
    c = ConfigDict()
    c.run = ""  # a run directory with calib/ and moe_init/; required
    c.weights = "0,0.5,2"  # train.locality_weight values
    c.domain_targets = "0"  # train.domain_target values (router target towards the label)
    c.router_steps = 4  # router steps per point (1,024 tokens each)
    c.eval_tokens = 1024  # validation tokens per domain (a multiple of 512)
    c.out = "runs/locality_sweep"  # output prefix (.json, .png)
    c.train_config = "configs/smollm2_135m.py:eight"  # the run's training config
    return c
