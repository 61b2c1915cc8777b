"""Token sampling: greedy, temperature, top-k and top-p, per row of a batch."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp


@dataclasses.dataclass(frozen=True)
class SamplingParams:
    temperature: float = 0.0  # 0 = greedy
    top_k: int = 0  # 0 = no limit
    top_p: float = 1.0

    def __post_init__(self):
        if self.temperature < 0:
            raise ValueError(f"temperature must be >= 0, got {self.temperature}")
        if self.top_k < 0:
            raise ValueError(f"top_k must be >= 0, got {self.top_k}")
        if not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0


def sample(
    logits_BxV: jax.Array,
    key: jax.Array,
    temperature_B: jax.Array,
    top_k_B: jax.Array,
    top_p_B: jax.Array,
) -> jax.Array:
    """Sample one token per row; rows with temperature 0 take the argmax."""
    logits = logits_BxV.astype(jnp.float32)
    greedy_B = jnp.argmax(logits, axis=-1)
    t = jnp.where(temperature_B > 0, temperature_B, 1.0)[:, None]
    srt_BxV = jnp.sort(logits / t, axis=-1)[:, ::-1]
    V = logits.shape[-1]
    rank = jnp.arange(V)[None, :]
    keep = (top_k_B[:, None] == 0) | (rank < top_k_B[:, None])
    probs = jax.nn.softmax(jnp.where(keep, srt_BxV, -jnp.inf), axis=-1)
    cum_excl = jnp.cumsum(probs, axis=-1) - probs
    keep = keep & (cum_excl < top_p_B[:, None])
    # Threshold in value space: keep every logit >= the smallest kept sorted logit.
    n_keep = jnp.maximum(keep.sum(-1), 1)
    thresh = jnp.take_along_axis(srt_BxV, (n_keep - 1)[:, None], axis=-1)
    scaled = logits / t
    masked = jnp.where(scaled >= thresh, scaled, -jnp.inf)
    sampled_B = jax.random.categorical(key, masked, axis=-1)
    return jnp.where(temperature_B > 0, sampled_B, greedy_B).astype(jnp.int32)


def sample_uniform(logits_BxV: jax.Array, key: jax.Array, sp: SamplingParams) -> jax.Array:
    """Same sampling settings for every row; greedy skips the sort entirely."""
    if sp.greedy:
        return jnp.argmax(logits_BxV, axis=-1).astype(jnp.int32)
    B = logits_BxV.shape[0]
    return sample(
        logits_BxV,
        key,
        jnp.full((B,), sp.temperature, jnp.float32),
        jnp.full((B,), sp.top_k, jnp.int32),
        jnp.full((B,), sp.top_p, jnp.float32),
    )


def sample_rows(logits_BxV, temp_B, top_k_B, top_p_B, seed_B, count_B) -> jax.Array:
    """Next token per row with its own settings; row b's randomness is the key
    fold_in(key(seed_b), count_b) alone, so a request's tokens do not depend on its batch."""
    keys = jax.vmap(lambda s, c: jax.random.fold_in(jax.random.key(s), c))(seed_B, count_B)
    one = lambda l, k, t, tk, tp: sample(l[None], k, t[None], tk[None], tp[None])[0]
    return jax.vmap(one)(logits_BxV, keys, temp_B, top_k_B, top_p_B)
