"""The refit's ridge least squares solved block by block (refactor/reconstruct.py).

`reconstruct.ridge_refit` solves one joint (n x n) system from full [F, F] Gram matrices. Here
each token group g brings only its Gram over the columns it uses (N_g of them) and the matching
right-hand side, and Read-ME's structure (part 0 = the shared expert, in every group; every other
part owned by one group) is solved by eliminating each group's own block as it arrives, then the
shared block (Schur complement): memory of one group's blocks at a time and O(sum own^3 +
shared^3) work instead of O(n^3). Other structures assemble the joint system from the blocks.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np


def _own_parts(parts: Sequence[np.ndarray], uses: Sequence[Sequence[int]]):
    """Per group, its parts other than part 0, when part 0 is in every group and every other
    part in exactly one (Read-ME: shared + private experts; static: one part); else None."""
    count = [0] * len(parts)
    for used in uses:
        for j in used:
            count[j] += 1
    if any(0 not in used for used in uses) or any(c != 1 for c in count[1:]):
        return None
    return [[j for j in used if j != 0] for used in uses]


def ridge_refit_blocks(
    local_grams: Sequence[np.ndarray],
    cross: Sequence[np.ndarray],
    w_down_FxD: np.ndarray,
    parts: Sequence[np.ndarray],
    uses: Sequence[Sequence[int]],
    ridge: float,
) -> list[np.ndarray]:
    """`ridge_refit` from each group's Gram over its own columns only.

    Group g's columns are cols_g = concat(parts[j] for j in uses[g]) (N_g of them).
    local_grams[g]: h_g[:, cols_g]^T h_g[:, cols_g] [N_g, N_g]; cross[g]: h_g[:, cols_g]^T
    (h_g W_down) [N_g, D] (the right-hand side; for ridge_refit's G that is G[cols_g] W_down).
    Read-ME's structure (part 0 shared by every group, each other part owned by one group) is
    solved by eliminating each group's own block and then the shared one (Schur complement):
    O(sum of own^3 + shared^3) instead of O(n^3) for the joint n x n system, which is assembled
    only for other structures. Same solution as ridge_refit up to rounding; f64 inside.
    Returns the refit rows of each part, [len(parts[p]), D] (f32)."""
    if len(local_grams) != len(uses) or len(cross) != len(uses):
        raise ValueError(f"{len(local_grams)} Gram matrices for {len(uses)} token groups")
    n = sum(len(p) for p in parts)
    lam = ridge * sum(float(np.trace(G)) for G in local_grams) / max(n, 1)
    return solve_blocks(zip(local_grams, cross, strict=True), w_down_FxD, parts, uses, lam)


def solve_blocks(blocks, w_down_FxD, parts, uses, lam: float, shared_rhs=None) -> list[np.ndarray]:
    """ridge_refit_blocks with lam given and `blocks` an iterable of (local Gram, cross) per
    group, consumed one group at a time: with Read-ME's structure a group's blocks are dropped
    as soon as its own part is eliminated (only [own, shared + D] is kept per group).
    shared_rhs: with Read-ME's structure, a callable giving the shared rows of the right-hand
    side summed over groups [shared, D], called once every group is consumed (the crosses'
    shared rows are then zero: reconstruct._group_blocks)."""
    w = w_down_FxD  # rows are taken in f64 as needed (no f64 copy of the whole [F, D])
    sizes = [len(p) for p in parts]
    if sum(sizes) == 0:
        return [np.zeros((0, w.shape[1]), np.float32) for _ in parts]
    own = _own_parts(parts, uses)
    if own is None:
        local_grams, cross = zip(*blocks, strict=True)
        return _joint_blocks(local_grams, cross, w, parts, uses, lam)
    s = sizes[0]
    A00 = lam * np.eye(s)
    b0 = lam * np.asarray(w[parts[0]], np.float64)
    elim = []
    for (G, C), mine in zip(blocks, own, strict=True):
        G, C = np.asarray(G, np.float64), np.asarray(C, np.float64)
        A00 += G[:s, :s]
        b0 += C[:s]
        if G.shape[0] == s:
            elim.append(None)
            continue
        Aoo = G[s:, s:].copy()
        Aoo[np.diag_indices_from(Aoo)] += lam
        w0 = np.concatenate([np.asarray(w[parts[j]], np.float64) for j in mine])
        Y = np.linalg.solve(Aoo, np.concatenate([G[s:, :s], C[s:] + lam * w0], axis=1))
        del Aoo, w0
        A00 -= G[:s, s:] @ Y[:, :s]
        b0 -= G[:s, s:] @ Y[:, s:]
        elim.append(Y)
        del G, C
    if shared_rhs is not None:
        b0 += shared_rhs()
    x0 = np.linalg.solve(A00, b0) if s else np.zeros((0, w.shape[1]))
    out = [None] * len(parts)
    out[0] = x0.astype(np.float32)
    for Y, mine in zip(elim, own, strict=True):
        if Y is None:
            continue
        x = Y[:, s:] - Y[:, :s] @ x0
        offs = np.cumsum([0] + [sizes[j] for j in mine])
        for k, j in enumerate(mine):
            out[j] = x[offs[k] : offs[k + 1]].astype(np.float32)
    return out


def _joint_blocks(local_grams, cross, w, parts, uses, lam) -> list[np.ndarray]:
    """The joint (n x n) system of ridge_refit assembled from the groups' local blocks."""
    sizes = [len(p) for p in parts]
    offs = np.concatenate([[0], np.cumsum(sizes)]).astype(int)
    n = int(offs[-1])
    A = lam * np.eye(n)
    b = lam * np.concatenate([np.asarray(w[p], np.float64) for p in parts])
    for G, C, used in zip(local_grams, cross, uses, strict=True):
        lo = np.concatenate([[0], np.cumsum([sizes[j] for j in used])]).astype(int)
        for a, i in enumerate(used):
            si = slice(offs[i], offs[i + 1])
            b[si] += C[lo[a] : lo[a + 1]]
            for c, j in enumerate(used):
                A[si, offs[j] : offs[j + 1]] += G[lo[a] : lo[a + 1], lo[c] : lo[c + 1]]
    x = np.linalg.solve(A, b)
    return [x[offs[i] : offs[i + 1]].astype(np.float32) for i in range(len(parts))]
