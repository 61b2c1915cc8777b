"""Batch scheduling over requests whose next token's expert is known (pre-gating).

Dimension letters: E experts.

A request is either *waiting* (its prompt has not been prefilled) or *decoding* (it holds a
request slot and needs one decode step). Costs against the batch token budget: a prefill of an
n-token prompt costs n, a decode step costs 1. A request of cost above the budget is admitted
only into an otherwise empty batch, so nothing is refused forever.

Experts: a decode counts under the expert of its next token. A prefill's tokens have their own
experts (`prompt_experts`): for queueing in expert-aware batching the prefill counts, as one
unit of n tokens, under its prompt's *majority* expert (ties: the smaller id; `next_expert`
when `prompt_experts` is unknown); for the batch's expert set (`Batch.experts`, what the cache
must hold) every distinct expert of its prompt counts.

Policies (`schedule`): "expert" (paper Algorithm 1: a queue per expert; repeatedly take the
expert whose queue holds the most tokens and admit its requests, oldest first, while the budget
allows; one refinement: queues of experts the batch already needs, e.g. through a fairness
admission, come first since they add no expert), "cache" (cache-aware: Algorithm 1 with the
queues of experts resident in the expert cache (`resident`) before the others, so a batch
prefers work that needs no load; not in the paper), "decode" (ongoing decodes first, then
prefills; DeepSpeed style) and "prefill" (new prefills first; vLLM/TGI style).

Expert cap (`max_experts`, expert-aware policies only; our addition, not in the paper): Algorithm 1
fills the token budget, so when the budget does not bind (few request slots, short decodes)
it admits every queue and its batches need as many experts as decode-prioritized ones. With a
cap, a queue of an expert the batch does not need yet is admitted only while the batch needs
fewer than `max_experts` experts, and a prefill only if its experts keep the batch within the
cap; the others wait for a later step. Set to the expert cache's capacity C, a batch fits the
cache in one wave. Fairness admissions ignore the cap, and a request whose own experts exceed
it is admitted into an otherwise empty batch, so nothing waits forever.

Fairness comes first in every policy: a request that has been ready for `max_wait` steps
without being admitted is admitted before anything else, oldest first, so waits are bounded
(a waiting request also needs a free request slot, so its queue wait is bounded by slot
turnover as well).
"""

from __future__ import annotations

import dataclasses
import math
from collections import Counter
from collections.abc import Callable, Collection, Sequence

import numpy as np

WAITING, DECODING, DONE = "waiting", "decoding", "done"
POLICIES = ("expert", "cache", "decode", "prefill")


@dataclasses.dataclass
class Request:
    """Scheduler view of one request. `waiting_steps`: ready steps since last admitted."""

    id: int
    prompt_len: int
    max_new_tokens: int
    arrival_step: int = 0
    state: str = WAITING
    generated: int = 0
    next_expert: int = 0
    prompt_experts: Sequence[int] | None = None  # [prompt_len] expert per prompt token
    waiting_steps: int = 0

    @property
    def cost(self) -> int:
        return self.prompt_len if self.state == WAITING else 1

    @property
    def queue_expert(self) -> int:
        """Expert this request queues under (majority prompt expert for a prefill)."""
        if self.state == WAITING and self.prompt_experts is not None and len(self.prompt_experts):
            counts = Counter(int(e) for e in self.prompt_experts)
            return min(counts, key=lambda e: (-counts[e], e))
        return self.next_expert

    @property
    def experts(self) -> set[int]:
        """Experts this request's tokens need in its next batch."""
        if self.state == WAITING and self.prompt_experts is not None and len(self.prompt_experts):
            return {int(e) for e in self.prompt_experts}
        return {self.next_expert}


@dataclasses.dataclass
class Batch:
    step: int
    prefill: list[int]  # request ids, admission order
    decode: list[int]
    tokens: int
    experts: list[int]  # sorted distinct experts needed

    @property
    def ids(self) -> list[int]:
        return self.prefill + self.decode


class _Builder:
    def __init__(self, budget: int, free_slots: int | None):
        self.budget, self.free_slots = budget, free_slots
        self.tokens, self.chosen, self.ids = 0, [], set()

    def try_add(self, r: Request) -> bool:
        if r.id in self.ids:
            return False
        if self.tokens and self.tokens + r.cost > self.budget:
            return False
        if r.state == WAITING and self.free_slots is not None:
            if self.free_slots <= 0:
                return False
            self.free_slots -= 1
        self.tokens += r.cost
        self.chosen.append(r)
        self.ids.add(r.id)
        return True


def _age(r: Request) -> tuple:
    return (-r.waiting_steps, r.arrival_step, r.id)


def _fifo(r: Request) -> tuple:
    return (r.arrival_step, r.id)


def _expert_aware(
    ready: list[Request],
    b: _Builder,
    resident: Collection[int] = (),
    max_experts: int | None = None,
) -> None:
    queues: dict[int, list[Request]] = {}
    for r in sorted(ready, key=_fifo):
        if r.id not in b.ids:
            queues.setdefault(r.queue_expert, []).append(r)
    in_batch = set().union(*(r.experts for r in b.chosen))
    cap = math.inf if max_experts is None else max_experts
    while queues and b.tokens < b.budget:
        # experts the batch already needs come free; then (cache-aware) resident experts; then
        # the longest queue in tokens; ties: the queue whose head arrived first, then the
        # smaller expert id
        e = min(
            queues,
            key=lambda e: (
                e not in in_batch,
                e not in resident,
                -sum(r.cost for r in queues[e]),
                _fifo(queues[e][0]),
                e,
            ),
        )
        if b.chosen and e not in in_batch and len(in_batch) >= cap:
            break  # every queue left needs a new expert (in-batch queues come first)
        for r in queues.pop(e):
            if b.chosen and len(in_batch | r.experts) > cap:
                continue
            if b.try_add(r):
                in_batch |= r.experts


def check_max_experts(max_experts: int | None) -> None:
    """The expert cap is None (off) or >= 1; raises ValueError otherwise."""
    if max_experts is not None and max_experts < 1:
        raise ValueError(f"max_experts must be >= 1 or None, got {max_experts}")


def schedule(
    policy: str,
    ready: Sequence[Request],
    max_batch_tokens: int,
    *,
    step: int = 0,
    max_wait: int | None = 32,
    num_slots: int | None = None,
    resident: Collection[int] = (),
    max_experts: int | None = None,
) -> Batch:
    """Choose the next batch among `ready` (waiting or decoding) requests. Pure.

    `num_slots`: request slots of the decode engine; a prefill needs a free one (decoding
    requests hold theirs). `max_wait`: fairness bound in steps (None: off). `resident`: experts
    the expert cache holds now (read by the "cache" policy only). `max_experts`: the expert cap
    of the expert-aware policies (module doc; None: off; the other policies ignore it).
    Raises ValueError for an unknown policy, a budget below 1 or a cap below 1.
    """
    if policy not in POLICIES:
        raise ValueError(f"unknown batching policy {policy!r}; choose one of {POLICIES}")
    if max_batch_tokens < 1:
        raise ValueError(f"max_batch_tokens must be >= 1, got {max_batch_tokens}")
    check_max_experts(max_experts)
    ready = [r for r in ready if r.state in (WAITING, DECODING)]
    decoding = sum(r.state == DECODING for r in ready)
    b = _Builder(max_batch_tokens, None if num_slots is None else num_slots - decoding)
    if max_wait is not None:
        for r in sorted((r for r in ready if r.waiting_steps >= max_wait), key=_age):
            b.try_add(r)
    if policy in ("expert", "cache"):
        _expert_aware(ready, b, frozenset(resident) if policy == "cache" else (), max_experts)
    else:
        first = DECODING if policy == "decode" else WAITING
        for r in sorted(ready, key=lambda r: (r.state != first, *_fifo(r))):
            b.try_add(r)
    experts = sorted(set().union(*(r.experts for r in b.chosen))) if b.chosen else []
    return Batch(
        step=step,
        prefill=[r.id for r in b.chosen if r.state == WAITING],
        decode=[r.id for r in b.chosen if r.state == DECODING],
        tokens=b.tokens,
        experts=experts,
    )


def age(ready: Sequence[Request], batch: Batch) -> None:
    """After a step: admitted requests' waits reset, the others' grow by one."""
    admitted = set(batch.ids)
    for r in ready:
        if r.state in (WAITING, DECODING):
            r.waiting_steps = 0 if r.id in admitted else r.waiting_steps + 1


# ----------------------------------------------------------------------------- simulation


@dataclasses.dataclass
class ScheduleStats:
    steps: int
    completed: int
    unique_experts: list[int]  # per batch
    max_decode_wait: int  # longest a decoding request went without a step, in steps
    max_queue_wait: int  # longest a request waited from arrival to its prefill, in steps
    finish_step: dict[int, int]
    batches: list[Batch]

    @property
    def mean_unique_experts(self) -> float:
        return float(np.mean(self.unique_experts)) if self.unique_experts else 0.0


def simulate_schedule(
    policy: str,
    requests: Sequence[Request],
    next_expert: Callable[[Request], int],
    max_batch_tokens: int,
    *,
    max_wait: int | None = 32,
    num_slots: int | None = None,
    max_steps: int = 100_000,
    max_experts: int | None = None,
) -> ScheduleStats:
    """Drive `schedule` to completion with one batch per step (no model).

    `requests` are copied; each arrives at `arrival_step`. After a request's prefill or decode,
    `next_expert(request)` routes its new token (the request has `generated` already updated).
    """
    pending = sorted((dataclasses.replace(r) for r in requests), key=_fifo)
    live: list[Request] = []
    stats = ScheduleStats(0, 0, [], 0, 0, {}, [])
    step = 0
    while (pending or live) and step < max_steps:
        while pending and pending[0].arrival_step <= step:
            live.append(pending.pop(0))
        batch = schedule(
            policy,
            live,
            max_batch_tokens,
            step=step,
            max_wait=max_wait,
            num_slots=num_slots,
            max_experts=max_experts,
        )
        for r in live:
            if r.state == DECODING:
                stats.max_decode_wait = max(stats.max_decode_wait, r.waiting_steps)
            else:
                stats.max_queue_wait = max(stats.max_queue_wait, r.waiting_steps)
        age(live, batch)
        admitted = set(batch.ids)
        for r in live:
            if r.id not in admitted:
                continue
            r.state, r.generated = DECODING, r.generated + 1
            if r.generated >= r.max_new_tokens:
                r.state = DONE
                stats.finish_step[r.id] = step
            else:
                r.next_expert = int(next_expert(r))
        live = [r for r in live if r.state != DONE]
        if batch.ids:
            stats.unique_experts.append(len(batch.experts))
            stats.batches.append(batch)
        step += 1
    stats.steps, stats.completed = step, len(stats.finish_step)
    return stats
