"""Request traces for serving benchmarks: arrivals, prompts, output lengths; JSONL files.

Arrivals: Poisson at `rate` requests/s (exponential gaps), or bursty with gamma gaps of the
same mean and coefficient of variation `cv` (cv=1 is Poisson, cv>1 is burstier). The first
request arrives at 0 s.

Prompts come from the caller (held-out corpora): texts are used whole, token arrays are cropped
to a length drawn from `prompt_len` at a random offset; with texts, `prompt_len` (if given)
crops to that many whitespace-separated words. Prompt choice is uniform with replacement.

Lengths are drawn from a stated `LengthDist`: fixed, uniform [lo, hi], a list sampled uniformly
("choice"), or a lognormal with a given median and sigma clipped to [lo, hi].
Everything is seeded.

JSONL line: {"id": int, "arrival_s": float, "prompt": str | "prompt_tokens": [int],
"max_new_tokens": int}.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from readme_jax.data import load_offsets, load_tokens
from readme_jax.errors import UserError


class TraceError(UserError, ValueError):
    """A malformed trace file or trace specification."""


@dataclasses.dataclass(frozen=True)
class TraceRequest:
    id: int
    arrival_s: float
    max_new_tokens: int
    prompt: str | None = None
    prompt_tokens: tuple[int, ...] | None = None

    def to_json(self) -> dict:
        out = {"id": self.id, "arrival_s": self.arrival_s}
        if self.prompt is not None:
            out["prompt"] = self.prompt
        else:
            out["prompt_tokens"] = list(self.prompt_tokens)
        return out | {"max_new_tokens": self.max_new_tokens}


@dataclasses.dataclass(frozen=True)
class LengthDist:
    """A length distribution: kind in fixed / uniform / choice / lognormal."""

    kind: str = "lognormal"
    value: int = 128  # fixed
    lo: int = 1  # uniform, lognormal clip
    hi: int = 512
    median: float = 128.0  # lognormal
    sigma: float = 0.8
    values: tuple[int, ...] = ()  # choice

    def __post_init__(self):
        if self.kind not in ("fixed", "uniform", "choice", "lognormal"):
            raise TraceError(f"unknown length distribution {self.kind!r}")
        if self.kind == "choice" and not self.values:
            raise TraceError("a 'choice' length distribution needs values")
        if self.kind in ("uniform", "lognormal") and not 1 <= self.lo <= self.hi:
            raise TraceError(f"length bounds need 1 <= lo <= hi, got [{self.lo}, {self.hi}]")

    def sample(self, n: int, rng: np.random.Generator) -> np.ndarray:
        """[n] int lengths."""
        if self.kind == "fixed":
            return np.full(n, self.value, np.int64)
        if self.kind == "uniform":
            return rng.integers(self.lo, self.hi + 1, n)
        if self.kind == "choice":
            return rng.choice(np.asarray(self.values, np.int64), n)
        x = rng.lognormal(np.log(self.median), self.sigma, n)
        return np.clip(np.rint(x), self.lo, self.hi).astype(np.int64)

    def describe(self) -> str:
        return {
            "fixed": f"fixed {self.value}",
            "uniform": f"uniform [{self.lo}, {self.hi}]",
            "choice": f"uniform over {list(self.values)}",
            "lognormal": f"lognormal(median {self.median}, sigma {self.sigma}) "
            f"clipped to [{self.lo}, {self.hi}]",
        }[self.kind]


def arrival_times(n: int, rate: float, rng: np.random.Generator, cv: float = 1.0) -> np.ndarray:
    """[n] arrival seconds from 0: gamma gaps with mean 1/rate and coefficient of variation cv."""
    if rate <= 0 or cv <= 0:
        raise TraceError(f"need rate > 0 and cv > 0, got rate={rate}, cv={cv}")
    shape = 1.0 / cv**2
    gaps = rng.gamma(shape, 1.0 / (rate * shape), n)
    return np.concatenate([[0.0], np.cumsum(gaps[1:])])[:n]


def make_trace(
    prompts: Sequence[str] | Sequence[Sequence[int]],
    n: int,
    rate: float,
    *,
    cv: float = 1.0,
    output_len: LengthDist = LengthDist(),
    prompt_len: LengthDist | None = None,
    seed: int = 0,
) -> list[TraceRequest]:
    """`n` requests at `rate`/s (cv=1: Poisson), prompts drawn from `prompts`."""
    if not len(prompts):
        raise TraceError("make_trace needs at least one prompt")
    rng = np.random.default_rng(seed)
    arrivals = arrival_times(n, rate, rng, cv)
    picks = rng.integers(len(prompts), size=n)
    outs = output_len.sample(n, rng)
    lens = prompt_len.sample(n, rng) if prompt_len is not None else [None] * n
    trace = []
    for i in range(n):
        p = prompts[picks[i]]
        if isinstance(p, str):
            words = p.split()
            if lens[i] is not None and len(words) > lens[i]:
                start = int(rng.integers(len(words) - lens[i] + 1))
                p = " ".join(words[start : start + lens[i]])
            req = TraceRequest(i, float(arrivals[i]), int(outs[i]), prompt=p)
        else:
            toks = np.asarray(p).reshape(-1)
            if lens[i] is not None and len(toks) > lens[i]:
                start = int(rng.integers(len(toks) - lens[i] + 1))
                toks = toks[start : start + lens[i]]
            req = TraceRequest(
                i, float(arrivals[i]), int(outs[i]), prompt_tokens=tuple(map(int, toks))
            )
        trace.append(req)
    return trace


def save_trace(path: str | Path, trace: Sequence[TraceRequest]) -> None:
    with open(path, "w") as f:
        for r in trace:
            f.write(json.dumps(r.to_json()) + "\n")


def _parse(rec: object, where: str) -> TraceRequest:
    if not isinstance(rec, dict):
        raise TraceError(f"{where}: expected a JSON object, got {type(rec).__name__}")
    for key in ("id", "arrival_s", "max_new_tokens"):
        if key not in rec:
            raise TraceError(f"{where}: missing key {key!r}")
    if ("prompt" in rec) == ("prompt_tokens" in rec):
        raise TraceError(f"{where}: needs exactly one of 'prompt' or 'prompt_tokens'")
    rid, arrival, max_new = rec["id"], rec["arrival_s"], rec["max_new_tokens"]
    if not isinstance(rid, int) or isinstance(rid, bool):
        raise TraceError(f"{where}: 'id' must be an integer, got {rid!r}")
    if not isinstance(arrival, int | float) or isinstance(arrival, bool) or arrival < 0:
        raise TraceError(f"{where}: 'arrival_s' must be a number >= 0, got {arrival!r}")
    if not isinstance(max_new, int) or isinstance(max_new, bool) or max_new < 1:
        raise TraceError(f"{where}: 'max_new_tokens' must be an integer >= 1, got {max_new!r}")
    if "prompt" in rec:
        if not isinstance(rec["prompt"], str) or not rec["prompt"]:
            raise TraceError(f"{where}: 'prompt' must be a non-empty string")
        return TraceRequest(rid, float(arrival), max_new, prompt=rec["prompt"])
    toks = rec["prompt_tokens"]
    if (
        not isinstance(toks, list)
        or not toks
        or not all(isinstance(t, int) and not isinstance(t, bool) and t >= 0 for t in toks)
    ):
        raise TraceError(f"{where}: 'prompt_tokens' must be a non-empty list of ints >= 0")
    return TraceRequest(rid, float(arrival), max_new, prompt_tokens=tuple(toks))


def load_trace(path: str | Path) -> list[TraceRequest]:
    """Read a JSONL trace, sorted by arrival (stable); errors name the file and line."""
    trace, seen = [], {}
    with open(path) as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            where = f"{path}:{n}"
            try:
                rec = json.loads(line)
            except json.JSONDecodeError as err:
                raise TraceError(f"{where}: invalid JSON ({err.msg})") from None
            r = _parse(rec, where)
            if r.id in seen:
                raise TraceError(f"{where}: duplicate id {r.id} (first on line {seen[r.id]})")
            seen[r.id] = n
            trace.append(r)
    if not trace:
        raise TraceError(f"{path}: trace has no requests")
    return sorted(trace, key=lambda r: r.arrival_s)


def heldout_prompts(
    tokenizer, domains: Sequence[str], min_len: int, per_domain: int = 64, seed: int = 0
) -> list[np.ndarray]:
    """Prompt sources for `make_trace`: token arrays of held-out documents (each domain's
    validation split, EOS dropped) of at least `min_len` tokens, up to `per_domain` per domain
    (a seeded random choice). Raises TraceError for a domain with no such document."""
    rng = np.random.default_rng(seed)
    out = []
    for d in domains:
        toks = load_tokens(d, "validation", tokenizer)
        offs = load_offsets(d, "validation", tokenizer)
        docs = [np.asarray(toks[a : b - 1]) for a, b in zip(offs[:-1], offs[1:], strict=True)]
        docs = [x for x in docs if len(x) >= min_len]
        if not docs:
            raise TraceError(f"domain {d!r} has no held-out document of {min_len} tokens")
        out += [docs[i] for i in rng.permutation(len(docs))[:per_domain]]
    return out
