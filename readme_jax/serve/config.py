"""The serving engine's settings: EngineConfig, and its one mapping from the config block of
configs/engine.py (`EngineConfig.from_config(c.engine)`). "All experts resident" is normalised
in one place, `EngineConfig.for_experts(E)`, which the engine applies to the config it is given.
"""

from __future__ import annotations

import dataclasses

from readme_jax.model.config import ConfigError
from readme_jax.serve import batching
from readme_jax.serve.cache import POLICIES as CACHE_POLICIES


@dataclasses.dataclass(frozen=True)
class EngineConfig:
    num_slots: int = 8  # N request slots of the decode step
    max_len: int = 512  # context per slot: prompt + max_new_tokens must fit
    prefill_chunk: int = 32  # Q: prompt tokens per prefill call
    max_batch_tokens: int = 128  # scheduler budget: prefill tokens + decode rows
    batching: str = "expert"  # expert | cache | decode | prefill
    # "all experts resident" has one spelling: capacity None (a config's 0 maps to it) or >= E;
    # `for_experts` turns it into C = E with policy "all", the engine's only normalisation
    cache_policy: str = "belady"  # belady | lru | lfu | random; "all" once normalised
    capacity: int | None = None  # C expert slots; None: all E resident
    prefetch: bool = False
    max_wait: int | None = 32  # fairness bound in steps
    max_experts: int | None = None  # expert cap of expert-aware batching (serve.batching)
    belady_window: int | None = None
    policy_seed: int = 0
    include_eos: bool = False
    # dispatch the next decode step before reading this one when nothing waits to be admitted
    # and every expert is resident (ModelBackend.decode); outputs are the same either way
    lookahead: bool = True

    def __post_init__(self):
        if self.batching not in batching.POLICIES:
            raise ValueError(f"batching must be one of {batching.POLICIES}, got {self.batching!r}")
        if self.cache_policy not in CACHE_POLICIES:
            raise ValueError(
                f"cache_policy must be one of {sorted(CACHE_POLICIES)}, got {self.cache_policy!r}"
            )
        if self.capacity is not None and self.capacity < 1:
            raise ValueError(f"capacity must be >= 1 or None (all experts), got {self.capacity}")
        if self.num_slots < 1 or self.prefill_chunk < 1 or self.max_len < 2:
            raise ValueError("num_slots, prefill_chunk must be >= 1 and max_len >= 2")
        batching.check_max_experts(self.max_experts)

    @property
    def all_resident(self) -> bool:
        """Every expert stays on the device (no cache traffic): set by `for_experts`."""
        return self.cache_policy == "all"

    def for_experts(self, num_experts: int) -> EngineConfig:
        """This config for a model of E = `num_experts` experts, "all experts" normalised (the
        one place): capacity None, >= E or policy "all" -> capacity E, policy "all", no
        prefetch; otherwise unchanged. Idempotent."""
        E = num_experts
        if self.capacity is None or self.capacity >= E or self.cache_policy == "all":
            return dataclasses.replace(self, capacity=E, cache_policy="all", prefetch=False)
        return self

    @classmethod
    def from_config(cls, e) -> EngineConfig:
        """EngineConfig from the config block of configs/engine.py (`c.engine`): capacity 0 ->
        None (all experts), max_experts 0 -> None (no cap). Raises ConfigError for a value the
        engine cannot run, naming the key."""
        if e.capacity < 0 or e.max_experts < 0:
            raise ConfigError(
                "engine.capacity and engine.max_experts must be >= 0 (0 = all experts / no cap), "
                f"got {e.capacity} and {e.max_experts}"
            )
        try:
            return cls(
                num_slots=e.num_slots,
                max_len=e.max_len,
                prefill_chunk=e.prefill_chunk,
                max_batch_tokens=e.max_batch_tokens,
                batching=e.batching,
                cache_policy=e.cache_policy,
                capacity=e.capacity or None,
                prefetch=bool(e.prefetch),
                max_wait=e.max_wait,
                max_experts=e.max_experts or None,
                policy_seed=e.seed,
                lookahead=bool(e.lookahead),
            )
        except ValueError as err:
            raise ConfigError(f"engine: {err}") from err
