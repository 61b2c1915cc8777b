"""Routing analysis in NumPy: expert usage by domain, temporal locality, and the redundancy of
layer-wise routers (transition matrices and mutual information between adjacent layers).

Expert choices are integer arrays of expert ids. Top-k choices [..., k] count each slot; the
locality and layer statistics take top-1 choices (pass slot 0). Entropies and MI are in nats.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np


# ---------------------------------------------------------------- usage
@dataclasses.dataclass(frozen=True)
class Usage:
    domains: list[str]
    counts_DxE: np.ndarray  # tokens (choices) of domain d routed to expert e

    @property
    def fraction_DxE(self) -> np.ndarray:
        """Row-normalized: the share of each domain's tokens that expert e receives."""
        tot = self.counts_DxE.sum(1, keepdims=True)
        return self.counts_DxE / np.maximum(tot, 1)

    def to_dict(self) -> dict[str, Any]:
        return {
            "domains": list(self.domains),
            "counts": self.counts_DxE.tolist(),
            "fraction": self.fraction_DxE.tolist(),
        }


def expert_usage(choices_by_domain: Mapping[str, np.ndarray], n_experts: int) -> Usage:
    """Counts matrix domains x experts from each domain's expert ids (any shape)."""
    domains = list(choices_by_domain)
    counts = np.zeros((len(domains), n_experts), np.int64)
    for i, d in enumerate(domains):
        ids = np.asarray(choices_by_domain[d]).ravel()
        if ids.size and (ids.min() < 0 or ids.max() >= n_experts):
            raise ValueError(f"domain {d!r} has expert ids outside [0, {n_experts})")
        counts[i] = np.bincount(ids, minlength=n_experts)
    return Usage(domains, counts)


# ---------------------------------------------------------------- locality
@dataclasses.dataclass(frozen=True)
class Locality:
    n_kept: int  # tokens whose expert equals the previous token's (same sequence)
    n_pairs: int  # tokens that have a previous token
    n_tokens: int
    run_lengths: np.ndarray  # run_lengths[l] = number of maximal same-expert runs of length l

    @property
    def keep_fraction(self) -> float:
        return self.n_kept / self.n_pairs if self.n_pairs else float("nan")

    @property
    def mean_run_length(self) -> float:
        runs = self.run_lengths.sum()
        return float(self.n_tokens / runs) if runs else float("nan")

    def to_dict(self) -> dict[str, Any]:
        return {
            "keep_fraction": self.keep_fraction,
            "n_kept": self.n_kept,
            "n_pairs": self.n_pairs,
            "n_tokens": self.n_tokens,
            "mean_run_length": self.mean_run_length,
            "run_lengths": self.run_lengths.tolist(),
        }


def _sequences(choices: np.ndarray | Sequence[np.ndarray], lengths=None) -> list[np.ndarray]:
    if isinstance(choices, np.ndarray) and choices.ndim == 1:
        seqs = [choices]
    elif isinstance(choices, np.ndarray) and choices.ndim == 2:
        seqs = list(choices)
    else:
        seqs = [np.asarray(s) for s in choices]
    if lengths is not None:
        seqs = [s[: int(n)] for s, n in zip(seqs, lengths, strict=True)]
    return [np.asarray(s).ravel() for s in seqs]


def temporal_locality(
    choices: np.ndarray | Sequence[np.ndarray], lengths: Sequence[int] | None = None
) -> Locality:
    """Locality of top-1 expert ids: a 1-D sequence, [B, S] rows (`lengths` trims padding), or
    a list of 1-D sequences. Runs never cross sequence boundaries."""
    kept = pairs = total = 0
    runs: list[np.ndarray] = []
    for s in _sequences(choices, lengths):
        if s.size == 0:
            continue
        same = s[1:] == s[:-1]
        kept += int(same.sum())
        pairs += s.size - 1
        total += s.size
        starts = np.flatnonzero(np.concatenate([[True], ~same]))
        runs.append(np.diff(np.concatenate([starts, [s.size]])))
    all_runs = np.concatenate(runs) if runs else np.zeros(0, np.int64)
    hist = np.bincount(all_runs, minlength=2) if all_runs.size else np.zeros(2, np.int64)
    return Locality(kept, pairs, total, hist)


# ---------------------------------------------------------------- layer-wise routing
def joint_counts(a_T: np.ndarray, b_T: np.ndarray, n_experts: int) -> np.ndarray:
    """[E, E] counts of (a, b) pairs."""
    a, b = np.asarray(a_T).ravel(), np.asarray(b_T).ravel()
    return np.bincount(a * n_experts + b, minlength=n_experts * n_experts).reshape(
        n_experts, n_experts
    )


def entropy(p: np.ndarray) -> float:
    p = np.asarray(p, np.float64).ravel()
    p = p[p > 0] / p.sum()
    return float(-(p * np.log(p)).sum())


def mutual_information(joint_ExE: np.ndarray) -> float:
    """I(A; B) in nats from a joint count (or probability) table."""
    p = np.asarray(joint_ExE, np.float64)
    p = p / p.sum()
    pa, pb = p.sum(1, keepdims=True), p.sum(0, keepdims=True)
    nz = p > 0
    return float(max((p[nz] * np.log(p[nz] / (pa @ pb)[nz])).sum(), 0.0))


def normalized_mutual_information(joint_ExE: np.ndarray) -> float:
    """I / mean(H(A), H(B)) in [0, 1] (sklearn's default "arithmetic" normalization)."""
    p = np.asarray(joint_ExE, np.float64)
    h = 0.5 * (entropy(p.sum(1)) + entropy(p.sum(0)))
    return mutual_information(p) / h if h > 0 else 0.0


@dataclasses.dataclass(frozen=True)
class LayerRedundancy:
    transitions_PxExE: np.ndarray  # counts for adjacent pairs (l, l+1), P = L - 1
    mi_P: np.ndarray  # nats
    nmi_P: np.ndarray
    n_experts: int

    @property
    def transition_probs_PxExE(self) -> np.ndarray:
        """P(expert at layer l+1 | expert at layer l); rows of unseen experts are 0."""
        t = self.transitions_PxExE.astype(np.float64)
        return t / np.maximum(t.sum(-1, keepdims=True), 1)

    def to_dict(self) -> dict[str, Any]:
        return {
            "n_experts": self.n_experts,
            "log_n_experts": float(np.log(self.n_experts)),
            "mutual_information": self.mi_P.tolist(),
            "normalized_mi": self.nmi_P.tolist(),
            "mean_mutual_information": float(self.mi_P.mean()) if self.mi_P.size else None,
            "transitions": self.transitions_PxExE.tolist(),
        }


def layer_redundancy(choices_LxT: np.ndarray, n_experts: int) -> LayerRedundancy:
    """Transition counts and MI between adjacent layers' top-1 choices [L, T] (or [L, B, S])."""
    c = np.asarray(choices_LxT)
    c = c.reshape(c.shape[0], -1)
    if c.min() < 0 or c.max() >= n_experts:
        raise ValueError(f"expert ids outside [0, {n_experts})")
    joints = np.stack([joint_counts(c[i], c[i + 1], n_experts) for i in range(c.shape[0] - 1)])
    mi = np.array([mutual_information(j) for j in joints])
    nmi = np.array([normalized_mutual_information(j) for j in joints])
    return LayerRedundancy(joints, mi, nmi, n_experts)


def pairwise_mutual_information(choices_LxT: np.ndarray, n_experts: int) -> np.ndarray:
    """[L, L] MI (nats) between every pair of layers' top-1 choices."""
    c = np.asarray(choices_LxT).reshape(len(choices_LxT), -1)
    L = c.shape[0]
    out = np.zeros((L, L))
    for i in range(L):
        for j in range(i, L):
            out[i, j] = out[j, i] = mutual_information(joint_counts(c[i], c[j], n_experts))
    return out
