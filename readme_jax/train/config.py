"""The training settings as one typed value, resolved from the run's ml_collections config.

Sizing keys (`SIZING`) default to None in the config files and then come from
`c.train.presets[c.preset]`; any of them given on the command line wins over the preset:

  --config.preset=full --config.train.expert_steps=80
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

from readme_jax.errors import UserError
from readme_jax.model.config import DISPATCH_MODES

SIZING = (
    "rounds",
    "router_steps",
    "expert_steps",
    "batch_size",
    "router_batch_size",
    "seq_len",
    "micro_batch",
    "router_lr",
    "expert_lr",
    "save_every",
    "baselines",
)
PHASES = ("router", "expert")
BASELINES = ("layerwise", "static")


class TrainConfigError(UserError, ValueError):
    """A training config that cannot run; the message names the key to change."""


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    rounds: int = 2
    router_steps: int = 4
    expert_steps: int = 8
    batch_size: int = 4  # global sequences per expert-phase step (all micro-batches)
    router_batch_size: int = 0  # router-phase step; 0 = batch_size (paper: 64 vs 128)
    seq_len: int = 256
    micro_batch: int = 0  # gradient accumulation: sequences per micro-batch; 0 = whole batch
    router_lr: float = 5e-4
    expert_lr: float = 5e-5
    lr_decay: float = 0.8  # peak LR multiplier per round
    warmup_frac: float = 0.0  # of each phase's steps
    min_lr_frac: float = 0.1  # cosine floor, as a fraction of the phase's peak
    weight_decay: float = 0.01
    clip_norm: float = 1.0
    expert_params: str = "ffn"  # "ffn" (shared + routed experts) or "backbone" (all but router)
    lm_weight: float = 1.0
    kd_weight: float = 1.0
    temperature: float = 1.0
    target_top_frac: float = 0.5
    target_shared: bool = True  # count shared channels in the target (Eq. 4: shared ∪ private)
    target_temperature: float = 1.0  # < 1 sharpens the target: p ∝ counts^(1/T) (1 = Eq. 4)
    locality_weight: float = 0.0  # router phase: + weight * losses.switch_penalty (0 = off)
    domain_target: float = 0.0  # router target: (1 - w) * coverage target + w * one-hot(domain)
    target_prefix: bool = False  # coverage counts summed over each token's causal prefix
    head_chunk: int = 512  # tokens per LM-head chunk
    compute_dtype: str = "float32"  # "bfloat16": bf16 forward/backward, f32 master weights
    dispatch: str = ""  # MoE dispatch while training; "" = the model's; "auto": blocked on CPU
    remat: bool = False  # recompute FFN activations in the backward pass
    save_every: int = 10
    keep: int = 3  # train-state checkpoints kept on disk (>= 1; the newest `keep` steps)
    baselines: tuple[str, ...] = ()
    stop_after: int = 0  # debug: end this invocation after N steps, as if killed (no save)
    save_router_snapshot: bool = True  # RUN/moe_router/ after the first router phase
    # models saved along training at these expert-phase token counts (RUN/snapshots/)
    snapshots: tuple[int, ...] = ()
    num_threads: int = 2  # grain read threads

    def phase_batch(self, phase: str) -> int:
        return (self.router_batch_size or self.batch_size) if phase == "router" else self.batch_size

    def accum(self, phase: str) -> int:
        """Micro-batches per step of a phase."""
        return self.phase_batch(phase) // self.micro_batch if self.micro_batch else 1

    @property
    def data_batch(self) -> int:
        """Rows per data-pipeline batch; a step concatenates phase_batch / data_batch of them."""
        return math.gcd(self.batch_size, self.router_batch_size or self.batch_size)

    def phase_steps(self, phase: str) -> int:
        return self.router_steps if phase == "router" else self.expert_steps

    def peak_lr(self, phase: str, rnd: int) -> float:
        base = self.router_lr if phase == "router" else self.expert_lr
        return base * self.lr_decay**rnd

    def schedule(self) -> list[tuple[int, str, int]]:
        """[(round, phase, steps)] in training order (phases with 0 steps are dropped)."""
        out = []
        for r in range(self.rounds):
            for p in PHASES:
                if self.phase_steps(p) > 0:
                    out.append((r, p, self.phase_steps(p)))
        return out

    def tokens_per_step(self, phase: str = "expert") -> int:
        return self.phase_batch(phase) * self.seq_len

    def expert_tokens_at(self) -> dict[int, int]:
        """{global step: expert-phase tokens trained once that step is done}, for every step
        that ends an expert-phase step, plus step 0 (0 tokens). Router steps count in the
        global step (the static baseline skips their batches) but add no expert tokens."""
        out, g, tok = {0: 0}, 0, 0
        for _, phase, n in self.schedule():
            for _ in range(n):
                g += 1
                if phase == "expert":
                    tok += self.tokens_per_step("expert")
                    out[g] = tok
        return out

    def snapshot_steps(self) -> dict[int, int]:
        """{global step: expert tokens} of the requested snapshots (`snapshots`). Raises
        TrainConfigError for a count that no expert step ends on."""
        at = {tok: g for g, tok in self.expert_tokens_at().items()}
        bad = [t for t in self.snapshots if t not in at]
        if bad:
            per, total = self.tokens_per_step("expert"), max(at)
            raise TrainConfigError(
                f"train.snapshots={list(self.snapshots)}: {bad} is not reached at the end of an "
                f"expert step; choose multiples of {per} tokens (batch_size x seq_len) from 0 to "
                f"{total} (rounds x expert_steps x {per})"
            )
        return {at[t]: t for t in self.snapshots}


def _get(c: Any, key: str, default: Any = None) -> Any:
    return c[key] if key in c else default


def resolve(c: Any) -> TrainConfig:
    """TrainConfig from `c.train` (+ `c.train.presets[c.preset]` for unset sizing keys)."""
    t = c.train
    presets = _get(t, "presets", {}) or {}
    preset_name = _get(c, "preset", "")
    if preset_name and preset_name not in presets:
        raise TrainConfigError(
            f"unknown preset {preset_name!r}; choose from {sorted(presets)} (--config.preset=...)"
        )
    preset = dict(presets[preset_name]) if preset_name else {}
    kw: dict[str, Any] = {}
    for f in dataclasses.fields(TrainConfig):
        v = _get(t, f.name)
        if v is None:
            v = preset.get(f.name)
        if v is None:
            continue
        kw[f.name] = v
    b = kw.get("baselines", ())
    if isinstance(b, str):
        # "none" clears a preset's baselines from the command line (an empty flag value cannot)
        b = tuple(x.strip() for x in b.split(",") if x.strip() and x.strip() != "none")
    kw["baselines"] = tuple(b)
    kw["snapshots"] = _int_list(kw.get("snapshots", ()), "train.snapshots")
    tc = TrainConfig(**kw)
    validate(tc)
    return tc


def _int_list(v: Any, key: str) -> tuple[int, ...]:
    """'0,98304' (or a sequence of ints) as a sorted tuple of distinct non-negative ints."""
    items = [x.strip() for x in v.split(",") if x.strip()] if isinstance(v, str) else list(v)
    try:
        out = sorted({int(x) for x in items})
    except (TypeError, ValueError):
        raise TrainConfigError(f"{key}={v!r}: expected comma-separated token counts") from None
    if out and out[0] < 0:
        raise TrainConfigError(f"{key}={v!r}: token counts must be >= 0")
    return tuple(out)


def validate(tc: TrainConfig) -> None:
    bad = [b for b in tc.baselines if b not in BASELINES]
    if bad:
        raise TrainConfigError(f"train.baselines: unknown {bad}; choose from {BASELINES}")
    for phase in PHASES:
        if tc.micro_batch and tc.phase_batch(phase) % tc.micro_batch:
            raise TrainConfigError(
                f"the {phase} phase's batch ({tc.phase_batch(phase)}) is not divisible by "
                f"train.micro_batch={tc.micro_batch}"
            )
    if tc.expert_params not in ("ffn", "backbone"):
        raise TrainConfigError(
            f"train.expert_params must be 'ffn' or 'backbone', not {tc.expert_params!r}"
        )
    if tc.compute_dtype not in ("float32", "bfloat16"):
        raise TrainConfigError(
            f"train.compute_dtype must be float32 or bfloat16, not {tc.compute_dtype!r}"
        )
    if tc.dispatch not in ("", "auto", *DISPATCH_MODES):
        raise TrainConfigError(
            f"train.dispatch must be '', 'auto' or one of {DISPATCH_MODES}, not {tc.dispatch!r}"
        )
    if tc.rounds < 1 or tc.router_steps < 0 or tc.expert_steps < 0:
        raise TrainConfigError("train.rounds must be >= 1 and the step counts >= 0")
    if not tc.target_temperature > 0:
        raise TrainConfigError(f"train.target_temperature must be > 0, got {tc.target_temperature}")
    if not 0 <= tc.domain_target <= 1:
        raise TrainConfigError(f"train.domain_target must be in [0, 1], got {tc.domain_target}")
    if not 0 < tc.target_top_frac <= 1:
        raise TrainConfigError(f"train.target_top_frac must be in (0, 1], got {tc.target_top_frac}")
    tc.snapshot_steps()  # every requested count on an expert-step boundary
    if tc.keep < 1:
        raise TrainConfigError(
            f"train.keep={tc.keep} is out of range: allowed >= 1 (train-state checkpoints kept "
            "on disk; 1 keeps the newest only, with none to fall back to if it is damaged)"
        )
