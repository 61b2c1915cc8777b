"""Results and clocks of the serving engine: a request's result, a run's result and summary,
one live step's output, and the clocks that give a step its duration.

Dimension letters: the glossary in model/config.py.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np

OK, ERROR, CANCELLED = "ok", "error", "cancelled"


@dataclasses.dataclass
class RequestResult:
    id: int
    prompt_len: int
    status: str = OK  # ok | error | cancelled
    error: str | None = None
    finish_reason: str | None = None  # eos | length | cancelled
    tokens: list[int] = dataclasses.field(default_factory=list)
    experts: list[list[int]] = dataclasses.field(default_factory=list)  # per generated token
    weights: list[list[float]] = dataclasses.field(default_factory=list)
    prompt_experts: list[list[int]] = dataclasses.field(default_factory=list)  # [S][A]
    prompt_weights: list[list[float]] = dataclasses.field(default_factory=list)
    arrival_s: float = 0.0
    first_token_s: float | None = None
    finish_s: float | None = None
    arrival_step: int = 0
    first_token_step: int | None = None
    finish_step: int | None = None

    @property
    def latency_s(self) -> float | None:
        return None if self.finish_s is None else self.finish_s - self.arrival_s

    @property
    def normalized_latency(self) -> float | None:
        """End-to-end latency / generated tokens (the paper's metric)."""
        if self.status != OK or not self.tokens and self.finish_reason != "eos":
            return None
        return self.latency_s / max(1, len(self.tokens))

    def to_json(self) -> dict:
        return dataclasses.asdict(self)


@dataclasses.dataclass
class RunResult:
    config: Any  # engine.EngineConfig
    results: list[RequestResult]
    steps: list[dict]
    cache_stats: Any
    cache_log: list[dict]
    makespan_s: float
    num_experts: int

    def summary(self) -> dict:
        ok = [r for r in self.results if r.status == OK]
        lat = [r.normalized_latency for r in ok if r.normalized_latency is not None]
        gen = sum(len(r.tokens) for r in ok)
        uniq = [len(s["batch_experts"]) for s in self.steps]
        ttft = [r.first_token_s - r.arrival_s for r in ok if r.first_token_s is not None]
        st = self.cache_stats
        return {
            "requests": len(self.results),
            "completed": len(ok),
            "errors": len(self.results) - len(ok),
            "generated_tokens": gen,
            "steps": len(self.steps),
            "calls_per_step": float(np.mean([len(s["calls"]) for s in self.steps])) if uniq else 0,
            "waves_per_step": float(
                np.mean([sum(len(c["groups"]) for c in s["calls"]) for s in self.steps])
            )
            if uniq
            else 0,
            "makespan_s": self.makespan_s,
            "throughput_tok_s": gen / self.makespan_s if self.makespan_s > 0 else 0.0,
            "mean_norm_latency_s": float(np.mean(lat)) if lat else float("nan"),
            "p95_norm_latency_s": float(np.percentile(lat, 95)) if lat else float("nan"),
            "mean_ttft_s": float(np.mean(ttft)) if ttft else float("nan"),
            "unique_experts_per_batch": float(np.mean(uniq)) if uniq else 0.0,
            "hit_ratio": st.hit_ratio,
            "hits": st.hits,
            "misses": st.misses,
            "loads": st.loads,
            "bytes_moved": st.bytes_moved,
            "bytes_per_token": st.bytes_moved / gen if gen else 0.0,
            "wasted_prefetches": st.wasted_prefetches,
        }


@dataclasses.dataclass
class StepOutput:
    """What one `Engine.step` produced: (request id, token) in emission order, the requests it
    finished or rejected, its step record (None when no step ran), and `fault`: why the
    batched step itself failed (its requests are in `finished` with status error), None when it
    did not. A fault is the engine's, not one request's: a server stops on it."""

    tokens: list[tuple[int, int]] = dataclasses.field(default_factory=list)
    finished: list[RequestResult] = dataclasses.field(default_factory=list)
    record: dict | None = None
    fault: str | None = None


class WallClock:
    """Step duration = measured wall time of the step (host work, loads, compute)."""

    name = "wall"

    def reset(self) -> None:
        pass

    def duration(self, step: dict, wall_s: float, t_start: float) -> float:
        return wall_s


class StepClock:
    """Every step lasts `step_s`: a deterministic schedule (tests, step-count latencies)."""

    name = "step"

    def __init__(self, step_s: float = 1.0):
        self.step_s = step_s

    def reset(self) -> None:
        pass

    def duration(self, step: dict, wall_s: float, t_start: float) -> float:
        return self.step_s
