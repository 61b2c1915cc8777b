"""Expert construction rules: which FFN channels the shared core and each routed expert keep.

Read-ME (section 1.1) builds one expert per domain: per domain and layer M_d = the top
`remain_rate` channels by mean |h| (h = silu(x W_gate) * (x W_up), the input of down_proj); the
shared expert is the intersection of the M_d, expert d is M_d minus it. That is `build_expert_spec`
(refactor/experts.py), the "intersection" rule here. This module adds the rules of the
construction study (docs/logbook/construction.md):

  score      how a group ranks channels: "magnitude" (mean |h|, the paper's), "frequency"
             (the share of the group's tokens for which the channel is among the token's own top
             `remain_rate` channels: CMoE's activation rate, arXiv 2502.04416 section 3.1) or
             "obs" (the output error the channel's removal leaves after the refit of the others:
             the structured OBS criterion of ZipLM and SlimGPT, `stats.obs_scores`)
  shared     "intersection" (the paper's) or "core": the Fs channels with the highest pooled
             score over all calibration tokens (CMoE's shared core), Fs = shared_frac x kept
  experts    with "core": each group's W = kept - Fs channels outside the core: "overlap", the
             group's own top W by its score (a channel may sit in several experts), or
             "partition", each channel in at most one expert with balanced widths (a greedy
             assignment by lift, the group's score over the pooled one: what the group uses
             more than the average token; CMoE's balanced experts)

and the static control built by the same rule: the top `kept` channels of the pooled score
(`static_channels`). Token groups are domains (labels) or k-means clusters of the tokens'
activation patterns (refactor/cluster.py); `group_stats` measures both scores per group in one
dense pass.

Shapes: E groups (experts), L layers, F dense FFN width, T calibration tokens.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from readme_jax.model import llama
from readme_jax.model.config import ConfigError, LlamaConfig
from readme_jax.model.spec import ExpertSpec
from readme_jax.refactor.experts import build_expert_spec, expert_channel_masks
from readme_jax.refactor.stats import GroupStats
from readme_jax.refactor.targets import coverage_ffn, union_masks

SCORES = ("magnitude", "frequency", "obs")
SHARED_RULES = ("intersection", "core")
EXPERT_RULES = ("overlap", "partition")


@dataclasses.dataclass(frozen=True)
class Construction:
    """How channels are chosen (see the module docstring). The default is the paper's rule.

    shared_frac: the shared core's share of the kept channels per layer (rule "core" only).
    """

    score: str = "magnitude"
    shared: str = "intersection"
    experts: str = "overlap"
    shared_frac: float = 0.5

    def check(self) -> Construction:
        """Raise ConfigError naming the first bad field. Returns self."""
        rules = [
            ("score", self.score in SCORES, f"one of {list(SCORES)}"),
            ("shared", self.shared in SHARED_RULES, f"one of {list(SHARED_RULES)}"),
            ("experts", self.experts in EXPERT_RULES, f"one of {list(EXPERT_RULES)}"),
            ("shared_frac", 0.0 <= self.shared_frac <= 1.0, "[0, 1]"),
        ]
        for field, ok, allowed in rules:
            if not ok:
                v = getattr(self, field)
                raise ConfigError(f"refactor.{field}={v!r} is out of range: allowed {allowed}")
        if self.shared == "intersection" and self.experts == "partition":
            raise ConfigError("refactor.experts='partition' needs refactor.shared='core'")
        return self

    @property
    def name(self) -> str:
        """A short label: "magnitude/intersection", "frequency/core0.5/partition", ..."""
        if self.shared == "intersection":
            return f"{self.score}/intersection"
        return f"{self.score}/core{self.shared_frac:g}/{self.experts}"


# ---------------------------------------------------------------- channel rules
def kept_channels(remain_rate: float, F: int) -> int:
    """Channels a token uses per layer at `remain_rate` (the same rounding as the paper's rule)."""
    return max(1, int(round(remain_rate * F)))


def static_channels(stats: GroupStats, score: str, width: int) -> np.ndarray:
    """The static control: the top `width` channels per layer of the pooled score, sorted,
    [L, width] int32."""
    pooled = stats.pooled(score)
    top = np.argsort(-pooled, axis=-1, kind="stable")[:, :width]
    return np.sort(top, axis=-1).astype(np.int32)


def _pad(lists: list[np.ndarray], width: int) -> np.ndarray:
    out = np.full((len(lists), width), -1, np.int32)
    for i, idx in enumerate(lists):
        out[i, : len(idx)] = np.sort(idx)
    return out


def _partition(lift_ExF: np.ndarray, candidates: np.ndarray, width: int) -> list[np.ndarray]:
    """Each expert `width` channels from `candidates`, no channel twice: repeatedly the (expert,
    channel) pair with the highest lift among experts not yet full (greedy balanced assignment).
    Raises ValueError when E x width > len(candidates)."""
    E = lift_ExF.shape[0]
    if E * width > len(candidates):
        raise ValueError(
            f"{E} disjoint experts of {width} channels need {E * width} > {len(candidates)}"
        )
    sub = lift_ExF[:, candidates]
    order = np.argsort(-sub, axis=None, kind="stable")
    taken = np.zeros(len(candidates), bool)
    out: list[list[int]] = [[] for _ in range(E)]
    for flat in order:
        e, j = divmod(int(flat), len(candidates))
        if taken[j] or len(out[e]) >= width:
            continue
        out[e].append(int(candidates[j]))
        taken[j] = True
        if all(len(o) >= width for o in out):
            break
    return [np.asarray(o, np.int64) for o in out]


def build_spec(
    stats: GroupStats, remain_rate: float, names: list[str], c: Construction
) -> ExpertSpec:
    """The ExpertSpec of construction `c` at `remain_rate`: with rule "core", shared + one expert
    = k = round(remain_rate x F) channels in every layer (a "partition" grows the core to at
    least (k E - F) / (E - 1) channels so that E disjoint experts of k - Fs fit; at remain rate
    1 every channel is shared). The "intersection" rule is the paper's (`build_expert_spec`) on
    the chosen score. Raises ConfigError on a bad construction."""
    c.check()
    score = stats.score(c.score)
    E, L, F = score.shape
    if len(names) != E:
        raise ValueError(f"{len(names)} expert names for {E} groups")
    if c.shared == "intersection":
        return build_expert_spec(score, remain_rate, names)
    k = kept_channels(remain_rate, F)
    fs = int(round(c.shared_frac * k))
    if c.experts == "partition" and E > 1:
        # disjoint experts of width k - fs fit only if E (k - fs) <= F - fs: a larger core
        fs = max(fs, -(-(k * E - F) // (E - 1)))
    w = k - fs
    pooled = stats.pooled(c.score)
    # lift: how much more a group uses a channel than the average token (ratio of scores)
    lift = score / np.maximum(pooled[None], 1e-12)
    shared, experts = [], []
    for l in range(L):
        core = np.argsort(-pooled[l], kind="stable")[:fs]
        rest = np.setdiff1d(np.arange(F), core)
        if c.experts == "partition":
            ex = _partition(lift[:, l], rest, w)
        else:  # each group's own top-w outside the core, ranked by the group's score itself
            ex = [rest[np.argsort(-score[e, l, rest], kind="stable")[:w]] for e in range(E)]
        shared.append(core)
        experts.append(ex)
    shared_idx = _pad(shared, fs)
    expert_idx = np.stack([_pad(ex, w) for ex in experts])
    masks = np.zeros((E, L, F), bool)
    for l in range(L):
        masks[:, l, shared[l]] = True
        for e in range(E):
            masks[e, l, experts[l][e]] = True
    return ExpertSpec(list(names), float(remain_rate), masks, shared_idx, expert_idx)


def static_pruned(dense: dict[str, Any], kept_LxK: np.ndarray) -> dict[str, Any]:
    """A dense model keeping channels kept_LxK of every FFN (use with cfg.replace(ffn_dim=K))."""
    layers = dense["layers"]
    wgu, wdn = np.asarray(layers["w_gate_up"]), np.asarray(layers["w_down"])
    gu = np.stack([wgu[l][..., kept_LxK[l]] for l in range(len(kept_LxK))])
    dn = np.stack([wdn[l][kept_LxK[l]] for l in range(len(kept_LxK))])
    dt = layers["w_gate_up"].dtype
    new = {**layers, "w_gate_up": jnp.asarray(gu, dt), "w_down": jnp.asarray(dn, dt)}
    return {**dense, "layers": new}


# ---------------------------------------------------------------- routing oracles and the refit
def coverage_experts(
    dense, tokens_BxS, union_LxFxE, cfg: LlamaConfig, top_frac: float, prefix: bool
):
    """Each token's oracle expert [B, S]: the argmax over experts of Eq. 4's coverage counts
    summed over layers, of the token itself, or (prefix=True) summed over the tokens up to it
    (causal: a pre-gating router sees the same prefix)."""
    ffn = coverage_ffn(union_LxFxE, top_frac)
    cov = jnp.sum(llama.forward(dense, tokens_BxS, cfg, ffn=ffn, return_hidden=True)[2], axis=0)
    if prefix:
        cov = jnp.cumsum(cov, axis=1)
    return jnp.argmax(cov, axis=-1).astype(jnp.int32)


@functools.partial(jax.jit, static_argnames=("cfg", "top_frac", "prefix"))
def _coverage_experts_jit(dense, tokens_BxS, union, cfg, top_frac, prefix):
    return coverage_experts(dense, tokens_BxS, union, cfg, top_frac, prefix)


def prefix_groups(dense, cfg: LlamaConfig, spec: ExpertSpec, batches, top_frac: float):
    """The causal-prefix oracle expert of every calibration token ([b, S] per batch, -1 at
    padding): the refit's token groups for context-clustered experts."""
    sh, ex = expert_channel_masks(spec, cfg.ffn_dim)
    union = union_masks(sh, ex)
    du = llama.unstack_layers(dense)
    out = []
    for t in batches:
        t = np.asarray(t)
        e = _coverage_experts_jit(
            du, jnp.asarray(np.maximum(t, 0), jnp.int32), union, cfg, top_frac, True
        )
        out.append(np.where(t >= 0, np.asarray(e), -1))
    return out


def refit_rows(backbone: dict, spec: ExpertSpec, rows: list[list[np.ndarray]]) -> dict:
    """Write refit down rows (per layer: shared, then expert e) into a stacked MoE backbone."""
    layers = backbone["layers"]
    sd, ed = np.array(layers["shared_down"]), np.array(layers["expert_down"])
    for l, r in enumerate(rows):
        sd[l, : len(r[0])] = r[0]
        for e in range(spec.num_experts):
            ed[l, e, : len(r[1 + e])] = r[1 + e]
    dt = layers["shared_down"].dtype
    new = {**layers, "shared_down": jnp.asarray(sd, dt), "expert_down": jnp.asarray(ed, dt)}
    return {**backbone, "layers": new}
