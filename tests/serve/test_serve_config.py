"""One engine config block (configs/engine.py), included by the serve and benchmark configs and
mapped by EngineConfig.from_config; "all experts" normalised in one place (for_experts)."""

from pathlib import Path

import pytest

from readme_jax import cli
from readme_jax.model.config import ConfigError
from readme_jax.serve.config import EngineConfig

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize("config", ["serve.py", "serve_bench.py"])
def test_both_configs_include_the_engine_block_and_map_to_engine_config(config):
    c = cli.parse_config(
        ROOT / "configs" / config, ["--config.engine.capacity=3", "--config.engine.num_slots=4"]
    )
    ec = EngineConfig.from_config(c.engine)
    assert (ec.capacity, ec.num_slots, ec.cache_policy) == (3, 4, "belady")
    assert ec.max_experts is None and ec.policy_seed == c.engine.seed
    assert set(c.engine) == set(cli.parse_config(ROOT / "configs/serve.py", []).engine)


def test_capacity_zero_means_all_experts_normalised_once():
    c = cli.parse_config(ROOT / "configs/serve.py", ["--config.engine.capacity=0"])
    ec = EngineConfig.from_config(c.engine)
    assert ec.capacity is None and ec.prefetch  # as configured, not yet normalised
    for cfg in (ec, EngineConfig(capacity=9), EngineConfig(cache_policy="all", capacity=2)):
        n = cfg.for_experts(4)
        assert (n.capacity, n.cache_policy, n.prefetch, n.all_resident) == (4, "all", False, True)
        assert n.for_experts(4) == n  # idempotent
    cached = EngineConfig(capacity=2, cache_policy="lru", prefetch=True)
    assert cached.for_experts(4) == cached and not cached.all_resident


def test_a_bad_engine_value_is_one_config_error_naming_it():
    c = cli.parse_config(ROOT / "configs/serve.py", ["--config.engine.cache_policy=fifo"])
    with pytest.raises(ConfigError, match="cache_policy"):
        EngineConfig.from_config(c.engine)
    c = cli.parse_config(ROOT / "configs/serve.py", ["--config.engine.max_experts=-1"])
    with pytest.raises(ConfigError, match="max_experts"):
        EngineConfig.from_config(c.engine)
    with pytest.raises(ConfigError, match="engine.capacity"):  # moved keys get a hint
        cli.parse_config(ROOT / "configs/serve.py", ["--config.capacity=2"])
