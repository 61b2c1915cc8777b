"""Reconstruction at refactoring time: refit each layer's FFN down projection over kept channels.

Dropping FFN channels removes their contribution to the layer's output. Instead of leaving the
remaining down-projection rows as they were, this module solves for the rows that best
reproduce the dense FFN's output on calibration tokens, in closed form (ridge least squares), as
one-shot pruning methods do (SparseGPT, Frantar & Alistarh 2023, section 3: layer by layer, each
layer fitted on the inputs the already-compressed earlier layers produce).

Per layer l and token group g (a domain), with h_T x F = silu(x W_gate) * (x W_up) the dense
FFN activations of the group's tokens on the *refactored* model's own layer input, the group
uses a set of parts (Read-ME: the shared expert and its own expert; static pruning: the kept
channels) whose down rows W'_p are the unknowns, and the target is the dense output h W_down:

    min over W'   sum_g || sum_{p in uses(g)} h_g[:, P_p] W'_p  -  h_g W_down ||^2
                  + lam * || W' - W_down[kept] ||^2

One joint solve per layer (all parts together) from each group's Gram G_g = h_g^T h_g restricted
to the columns it uses, with right-hand side G_g W_down (no [T, D] target is kept); the shared +
private structure is solved block by block (refactor/block_solve.py): memory follows one layer.
The ridge term pulls toward the original rows (lam = ridge x mean diagonal of the data term):
with every channel kept the solution is W_down exactly; an unused channel keeps its row.

The first probe of the refit (SmolLM2, remain rate 0.5, ~3.6k held-out tokens per domain):
static pruning 87.7 -> 47.8 ppl with this refit; Read-ME's experts with domain-oracle routing
70.8 -> 44.0 with the joint solve (46.6 for static with the same refit).
"""

from __future__ import annotations

import dataclasses
import hashlib
import math
import os
from collections.abc import Callable, Sequence
from functools import partial
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from tqdm.auto import tqdm

from readme_jax.model import llama
from readme_jax.model.config import LlamaConfig
from readme_jax.model.spec import ExpertSpec
from readme_jax.refactor.block_solve import _own_parts, solve_blocks
from readme_jax.refactor.experts import (
    expert_channel_masks,
    top_channel_masks,
)
from readme_jax.refactor.targets import coverage_ffn, union_masks

Params = dict[str, Any]
MODES = ("lstsq", "none")
STATIC_REFIT_FILE = "static_refit.npz"


@dataclasses.dataclass(frozen=True)
class ReconstructConfig:
    """mode: "lstsq" (the refit above) or "none"; ridge: lam as a fraction of the mean diagonal
    of the data term; calib_sequences: calibration rows per domain used (0 = all given)."""

    mode: str = "lstsq"
    ridge: float = 1e-2
    calib_sequences: int = 0

    def __post_init__(self):
        if self.mode not in MODES:
            raise ValueError(f"refactor.reconstruct must be one of {MODES}, got {self.mode!r}")
        if not self.ridge >= 0:
            raise ValueError(f"refactor.ridge must be >= 0, got {self.ridge}")

    @classmethod
    def from_config(cls, c_refactor: Any) -> ReconstructConfig:
        """From the run config's `refactor` section (keys absent in older configs: "none")."""
        get = c_refactor.get
        return cls(get("reconstruct", "none"), get("ridge", 1e-2), get("calib_sequences", 0))


# ---------------------------------------------------------------- the closed-form solve
def ridge_refit(
    grams_GxFxF: Sequence[np.ndarray],
    w_down_FxD: np.ndarray,
    parts: Sequence[np.ndarray],
    uses: Sequence[Sequence[int]],
    ridge: float,
) -> list[np.ndarray]:
    """The joint ridge least-squares solve above for one layer.

    grams_GxFxF: per token group g, h_g^T h_g (f64 preferred). parts: channel indices (into F)
    of each unknown part. uses[g]: the parts group g's tokens use. Returns the refit down rows
    of each part, [len(parts[p]), D] (f32). Raises ValueError on mismatched shapes; with
    ridge = 0 the data term must be non-singular (numpy.linalg.LinAlgError otherwise).
    """
    if len(grams_GxFxF) != len(uses):
        raise ValueError(f"{len(grams_GxFxF)} Gram matrices for {len(uses)} token groups")
    F, D = w_down_FxD.shape
    w = np.asarray(w_down_FxD, np.float64)
    sizes = [len(p) for p in parts]
    offs = np.concatenate([[0], np.cumsum(sizes)]).astype(int)
    n = int(offs[-1])
    if n == 0:
        return [np.zeros((0, D), np.float32) for _ in parts]
    A = np.zeros((n, n))
    b = np.zeros((n, D))
    for G, used in zip(grams_GxFxF, uses, strict=True):
        G = np.asarray(G, np.float64)
        if G.shape != (F, F):
            raise ValueError(f"Gram matrix of shape {G.shape}, expected ({F}, {F})")
        for i in used:
            si = slice(offs[i], offs[i + 1])
            b[si] += G[parts[i]] @ w
            for j in used:
                A[si, offs[j] : offs[j + 1]] += G[np.ix_(parts[i], parts[j])]
    w0 = np.concatenate([w[p] for p in parts])
    lam = ridge * float(np.trace(A)) / n
    x = np.linalg.solve(A + lam * np.eye(n), b + lam * w0)
    return [x[offs[i] : offs[i + 1]].astype(np.float32) for i in range(len(parts))]


# ---------------------------------------------------------------- one layer on cached inputs
@partial(jax.jit, static_argnames=("cfg",))
def _layer_features(lp: Params, x_BxSxD, cfg: LlamaConfig):
    """(x after attention [B, S, D], FFN activations h [B, S, F]) of one layer."""
    B, S, _ = x_BxSxD.shape
    H, K = cfg.n_heads, cfg.n_kv_heads
    pos = jnp.broadcast_to(jnp.arange(S), (B, S))
    inv = llama.rope_inv_freq(cfg)
    h = llama.rms_norm(x_BxSxD, lp["attn_norm"], cfg.norm_eps)
    qkv = llama.qkv_proj(h, lp["wqkv"])
    q = llama.apply_rope(qkv[:, :, :H], pos, inv)
    k = llama.apply_rope(qkv[:, :, H : H + K], pos, inv)
    causal = jnp.broadcast_to(jnp.arange(S)[None, :] <= jnp.arange(S)[:, None], (B, S, S))
    o = llama.attention(q, k, qkv[:, :, H + K :], causal)
    x1 = x_BxSxD + llama.out_proj(o, lp["wo"]).astype(x_BxSxD.dtype)
    u = llama.rms_norm(x1, lp["mlp_norm"], cfg.norm_eps)
    gu = jnp.einsum("bsd,dgf->bsgf", u, lp["w_gate_up"])
    return x1, jax.nn.silu(gu[:, :, 0]) * gu[:, :, 1]


@jax.jit
def _masked_gram(act_BxSxF, mask_BxS):
    """h^T h [F, F] over the positions where mask_BxS is true (the full Gram of ridge_refit)."""
    hm = act_BxSxF * mask_BxS[..., None].astype(act_BxSxF.dtype)
    return jnp.einsum("bsf,bsg->fg", hm, hm)


_COLS_BUCKET = 256  # column counts are padded to a multiple of this: few compiled shapes


@partial(jax.jit, static_argnames=("start", "width"))
def _gram_rows(act_BxSxF, mask_BxS, cols_N, start: int = 0, width: int | None = None):
    """Rows cols of h^T h, columns [start, start + width) (default all F), [N, width], over the
    positions where mask_BxS is true; cols -1 = padding (zero rows). Entry for entry the same
    f32 sums as `_masked_gram`'s full [F, F] matrix (XLA:CPU sums a matmul entry alike whatever
    the output's shape)."""
    hm = act_BxSxF * mask_BxS[..., None].astype(act_BxSxF.dtype)
    hc = jnp.take(hm, jnp.maximum(cols_N, 0), axis=-1) * (cols_N >= 0).astype(hm.dtype)
    width = hm.shape[-1] - start if width is None else width
    return jnp.einsum("bsn,bsf->nf", hc, jax.lax.dynamic_slice_in_dim(hm, start, width, -1))


@jax.jit
def _gram_diag(act_BxSxF, mask_BxS):
    """The diagonal of `_masked_gram`, [F], bit for bit: from the [256, 256] diagonal blocks,
    as XLA:CPU sums a matmul entry alike whatever the output's shape (an elementwise
    square-and-sum rounds differently, and the ridge weight would move with it)."""
    B, S, F = act_BxSxF.shape
    hm = act_BxSxF * mask_BxS[..., None].astype(act_BxSxF.dtype)
    k = -(-F // _COLS_BUCKET)
    x = jnp.pad(hm, ((0, 0), (0, 0), (0, k * _COLS_BUCKET - F))).reshape(B, S, k, _COLS_BUCKET)
    blocks = jnp.einsum("bskn,bskm->knm", x, x)
    return jnp.diagonal(blocks, axis1=1, axis2=2).reshape(-1)[:F]


_F_CHUNK = 2048  # Gram rows are formed this many columns of F at a time


def _group_blocks(acts, items, present, cols, w_down_FxD, shared: int = 0, acc=None):
    """Per group g, (its local Gram R[:, cols_g], R W_down) from its Gram rows R [N_g, F]
    (ridge_refit's G[cols] W_down: the same f32 sums, accumulated over batches in f64 in the
    same order), one group at a time and R one chunk of F columns at a time.

    shared > 0: the first `shared` columns of every group are the shared part, whose rows of
    R W_down only enter the solve summed over groups: those rows of each C are left zero and
    the groups' rows R[:shared] are summed into acc["shared_rows"] [shared, F] instead
    (`_shared_rhs` multiplies once: the f64 product, most of the refit's time, shrinks from
    sum_g N_g to shared + sum_g own rows)."""
    F = w_down_FxD.shape[0]
    s = shared
    if s:
        acc["shared_rows"] = np.zeros((s, F))
    for g, c in enumerate(cols):
        N, pc = len(c), _padded(c)
        G = np.zeros((N, N))
        C = np.zeros((N, w_down_FxD.shape[1]))
        where = np.full(F, -1)
        where[c] = np.arange(N)
        for start in range(0, F, _F_CHUNK):
            width = min(_F_CHUNK, F - start)
            R = np.zeros((N, width))
            for i, (_, g_BxS) in enumerate(items):
                if g in present[i]:
                    m = jnp.asarray(g_BxS == g)
                    R += np.asarray(_gram_rows(acts[i], m, pc, start, width))[:N]
            C[s:] += R[s:] @ np.asarray(w_down_FxD[start : start + width], np.float64)
            if s:
                acc["shared_rows"][:, start : start + width] += R[:s]
            k = where[start : start + width]
            G[:, k[k >= 0]] = R[:, k >= 0]
            del R
        yield G, C


def _shared_rhs(acc, w_down_FxD) -> np.ndarray:
    """sum_g R_g[:shared] W_down [shared, D] (`_group_blocks`), chunk by chunk of F."""
    R = acc.pop("shared_rows")
    out = np.zeros((R.shape[0], w_down_FxD.shape[1]))
    for start in range(0, R.shape[1], _F_CHUNK):
        end = min(start + _F_CHUNK, R.shape[1])
        out += R[:, start:end] @ np.asarray(w_down_FxD[start:end], np.float64)
    return out


def _padded(cols: np.ndarray) -> jax.Array:
    n = -(-max(len(cols), 1) // _COLS_BUCKET) * _COLS_BUCKET
    return jnp.asarray(np.pad(cols, (0, n - len(cols)), constant_values=-1), jnp.int32)


def _layer_f32(dense: Params, l: int) -> Params:
    """Layer l's weights in f32 (stacked, per-layer or read from disk): one layer's copy at a
    time, so a bf16 model is never held in f32 whole."""
    layers = dense["layers"]
    if not isinstance(layers, dict):  # a list, or layers read from disk (checkpoints.layers)
        return {k: jnp.asarray(v, jnp.float32) for k, v in layers[l].items()}
    return {k: _slice_f32(v, l) for k, v in layers.items()}


@jax.jit
def _slice_f32(stacked_LxX, l):
    """stacked[l] in f32, sliced and converted in one pass (no copy in the model's dtype)."""
    return jax.lax.dynamic_index_in_dim(stacked_LxX, l, keepdims=False).astype(jnp.float32)


def _grouped(tokens: np.ndarray, groups: np.ndarray):
    """(tokens [b, S] int32, groups [b, S] int (-1 = no group: padding or unassigned))."""
    t = np.asarray(tokens)
    g = np.where(t >= 0, np.asarray(groups), -1)
    return jnp.asarray(np.where(t >= 0, t, 0), jnp.int32), g


PartsFn = Callable[[int], tuple[list[np.ndarray], list[list[int]]]]


def domain_groups(
    group_batches: Sequence[Sequence[np.ndarray]],
) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """(batches, token groups) where every token of group_batches[g]'s batches is in group g."""
    batches = [b for bs in group_batches for b in bs]
    groups = [np.full(np.shape(b), g) for g, bs in enumerate(group_batches) for b in bs]
    return batches, groups


def sequential_refit(
    dense: Params,
    cfg: LlamaConfig,
    batches: Sequence[np.ndarray],
    token_groups: Sequence[np.ndarray],
    parts_fn: PartsFn,
    ridge: float,
    desc: str = "reconstruct",
    on_layer: Callable[[int, list[np.ndarray]], None] | None = None,
    resume: str | Path | None = None,
) -> list[list[np.ndarray]]:
    """Refit every layer in order, each on the inputs the refit earlier layers produce.

    batches[i]: calibration tokens [b, S] (-1 = masked position); token_groups[i] [b, S]: the
    group of each token (-1 = in no group): a domain for domain experts (`domain_groups`), the
    routing-target expert for clustered ones. parts_fn(l) -> (parts, uses) of layer l (see
    `ridge_refit`; its uses set the number of groups G); a token's propagated FFN output is the
    sum of its group's parts. Returns, per layer, the refit rows of each part; with `on_layer`,
    calls on_layer(l, rows) instead as each layer is done and returns [] (the caller writes the
    rows into its final arrays). Cost: one forward of every calibration token; per layer and
    group, the rows [N_g, F] of its Gram for the columns it uses, one group at a time, then the
    block solve (refactor/block_solve.py). The sums are those of the full-Gram path, so the rows
    match `ridge_refit` on full Grams to rounding. Memory follows one layer: its weights in f32
    (the model stays in its dtype), one group's rows, the groups' [N_g, N_g] blocks and the
    calibration tokens' activations. Raises ValueError if token_groups does not match.

    resume (with on_layer, which must persist what it writes): a directory where the next
    layer's inputs are saved after each layer (`RefitState`); a run that finds them there
    starts at that layer instead of the first."""
    if resume is not None and on_layer is None:
        raise ValueError("resume needs on_layer: the rows of finished layers are not returned")
    if len(token_groups) != len(batches) or any(
        np.shape(g) != np.shape(t) for g, t in zip(token_groups, batches, strict=False)
    ):
        raise ValueError("token_groups must give one [b, S] group array per calibration batch")
    items = [_grouped(t, g) for t, g in zip(batches, token_groups, strict=True)]
    embed = dense["embed"]
    state = None if resume is None else RefitState(resume, items, ridge)
    saved = None if state is None else state.load()
    if saved is not None:
        start, xs = saved
    else:
        start, xs = 0, [jnp.asarray(embed[t], jnp.float32) for t, _ in items]
    out = []
    for l in tqdm(range(start, cfg.n_layers), desc=desc, leave=False):
        lp = _layer_f32(dense, l)
        parts, uses = parts_fn(l)
        cols = [np.concatenate([parts[j] for j in used]).astype(np.int64) for used in uses]
        cache = [_layer_features(lp, xs[i], cfg) for i in range(len(items))]
        present = [[int(g) for g in np.unique(g_BxS[g_BxS >= 0])] for _, g_BxS in items]
        w_down = np.asarray(lp["w_down"])
        del lp  # the features are computed: only w_down is needed until the next layer
        sq = np.zeros((len(uses), cfg.ffn_dim))  # per group, the diagonal of its Gram
        for i, (_, g_BxS) in enumerate(items):
            for g in present[i]:
                sq[g] += np.asarray(_gram_diag(cache[i][1], jnp.asarray(g_BxS == g)))
        n = sum(len(q) for q in parts)
        lam = ridge * sum(float(np.sum(sq[g][c])) for g, c in enumerate(cols)) / max(n, 1)
        acts = [a for _, a in cache]
        s = len(parts[0]) if len(uses) > 1 and _own_parts(parts, uses) is not None else 0
        acc: dict[str, np.ndarray] = {}
        blocks = _group_blocks(acts, items, present, cols, w_down, s, acc)
        rhs = partial(_shared_rhs, acc, w_down) if s else None
        rows = solve_blocks(blocks, w_down, parts, uses, lam, rhs)
        del w_down
        if on_layer is None:
            out.append(rows)
        else:
            on_layer(l, rows)
        for i, (x1, act) in enumerate(cache):
            y = x1
            for g in present[i]:
                w = jnp.asarray(np.concatenate([rows[j] for j in uses[g]]))
                yg = act[..., cols[g]] @ w
                if len(present[i]) > 1:  # several groups in the batch: each token takes its own
                    yg = jnp.where(jnp.asarray(items[i][1] == g)[..., None], yg, 0)
                y = y + yg
            xs[i] = y
        del cache, acts
        if state is not None:
            state.save(l + 1, xs)
    return out


class RefitState:
    """The refit's progress in `root`/refit_state.npz: the next layer and its inputs (one f32
    [b, S, D] array per calibration batch), replaced atomically after each layer; a key of the
    calibration tokens, their groups and the ridge guards against resuming another refit."""

    def __init__(self, root: str | Path, items, ridge: float):
        self.path = Path(root) / "refit_state.npz"
        h = hashlib.sha256(repr(float(ridge)).encode())
        for t, g in items:
            h.update(np.asarray(t).tobytes())
            h.update(np.asarray(g, np.int64).tobytes())
        self.key = h.hexdigest()

    def load(self) -> tuple[int, list[jax.Array]] | None:
        """(next layer, its inputs), or None when nothing was saved. Raises ValueError when the
        saved state belongs to other calibration tokens."""
        if not self.path.exists():
            return None
        with np.load(self.path) as z:
            if str(z["key"]) != self.key:
                raise ValueError(
                    f"{self.path} holds the progress of a refit on other calibration tokens; "
                    "delete it to start over"
                )
            n = len([k for k in z.files if k.startswith("x")])
            return int(z["next_layer"]), [jnp.asarray(z[f"x{i}"]) for i in range(n)]

    def save(self, next_layer: int, xs: Sequence[jax.Array]) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_suffix(".tmp.npz")
        arrays = {f"x{i}": np.asarray(x) for i, x in enumerate(xs)}
        np.savez(tmp, next_layer=next_layer, key=self.key, **arrays)
        os.replace(tmp, self.path)


# ---------------------------------------------------------------- Read-ME and static builders
def _real(idx: np.ndarray) -> np.ndarray:
    return idx[idx >= 0]


def readme_parts(spec: ExpertSpec) -> PartsFn:
    """Part 0 = shared expert (all groups), part 1 + e = expert e (group e only)."""
    E = spec.num_experts

    def fn(l: int):
        parts = [_real(spec.shared_idx_LxFs[l])]
        parts += [_real(spec.expert_idx_LxExFe[l, e]) for e in range(E)]
        return parts, [[0, 1 + e] for e in range(E)]

    return fn


@partial(jax.jit, static_argnames=("cfg", "top_frac"))
def _target_experts(dense: Params, tokens_BxS, union_LxFxE, cfg: LlamaConfig, top_frac: float):
    """argmax over experts of the dense Eq. 4 coverage counts, summed over layers: [B, S]."""
    cov_LxBxSxE = llama.forward(
        dense, tokens_BxS, cfg, ffn=coverage_ffn(union_LxFxE, top_frac), return_hidden=True
    )[2]
    return jnp.argmax(jnp.sum(cov_LxBxSxE, axis=0), axis=-1)


def target_expert_groups(
    dense: Params,
    cfg: LlamaConfig,
    spec: ExpertSpec,
    batches: Sequence[np.ndarray],
    top_frac: float = 0.5,
) -> list[np.ndarray]:
    """Each calibration token's expert under the paper's routing target (Eq. 4: the expert whose
    shared + private channels cover most of the token's top-`top_frac` dense channels, summed
    over layers), [b, S] per batch (-1 at padding). The token groups of the refit for experts
    without domain labels (k-means clusters), where no label says which expert a token uses;
    the router is trained towards the same target."""
    shared, experts = expert_channel_masks(spec, cfg.ffn_dim)
    union = union_masks(shared, experts)
    out = []  # stacked layers are sliced inside the jitted forward: no host copy of the model
    for t in batches:
        t = np.asarray(t)
        e = _target_experts(dense, jnp.asarray(np.maximum(t, 0), jnp.int32), union, cfg, top_frac)
        out.append(np.where(t >= 0, np.asarray(e), -1))
    return out


def static_kept(scores_ExLxF: np.ndarray, remain_rate: float) -> np.ndarray:
    """[L, k] kept channel indices of the static baseline (same rule as static_pruned_params)."""
    mask = top_channel_masks(np.asarray(scores_ExLxF).mean(0, keepdims=True), remain_rate)[0]
    return np.stack([np.flatnonzero(m) for m in mask])


def reconstruct_static(
    dense: Params,
    cfg: LlamaConfig,
    kept_LxK: np.ndarray,
    domain_batches: dict[str, Sequence[np.ndarray]],
    ridge: float,
) -> np.ndarray:
    """Refit down rows [L, k, D] f32 of the static baseline (all domains' tokens, one part),
    written layer by layer into the one array returned."""
    batches = [b for bs in domain_batches.values() for b in bs]
    groups = [np.zeros(np.shape(b), int) for b in batches]
    out = np.zeros((*np.shape(kept_LxK), cfg.dim), np.float32)

    def write(l: int, rows: list[np.ndarray]) -> None:
        out[l] = rows[0]

    parts = lambda l: ([kept_LxK[l]], [[0]])  # noqa: E731
    sequential_refit(dense, cfg, batches, groups, parts, ridge, "reconstruct static", write)
    return out


def apply_static_refit(
    moe_dir: str | Path, static_params: Params, required: bool = False
) -> Params:
    """The static baseline's params with the refit down rows that run directories refactored
    before the static control (pipeline.StaticControl) saved in `moe_dir`/static_refit.npz
    (kept, w_down), or unchanged when there is none (reconstruction off).

    required: the Read-ME experts in `moe_dir` were refit, so a comparison needs the static
    baseline refit too. Raises FileNotFoundError then if the rows are missing (the refactor
    stage skips them when the configured baselines had no static one), and ValueError if the
    saved rows do not match the baseline's width."""
    f = Path(moe_dir) / STATIC_REFIT_FILE
    if not f.exists():
        if required:
            raise FileNotFoundError(
                f"{f} not found, but the Read-ME experts in {moe_dir} were refit: the static "
                "baseline would train without the same refit (an unfair comparison). Rerun the "
                f"refactor stage with `static` in train.baselines (delete {moe_dir} first): it "
                "saves the static control, built by the same rule and refit, beside the model"
            )
        return static_params
    z = np.load(f)
    layers = static_params["layers"]
    w = layers["w_down"]
    shape = tuple(w.shape) if not isinstance(w, list) else (len(w), *w[0].shape)
    if tuple(z["w_down"].shape) != shape:
        raise ValueError(f"{f}: refit rows {z['w_down'].shape} != static width {shape}")
    return {**static_params, "layers": {**layers, "w_down": jnp.asarray(z["w_down"], w.dtype)}}


def layer_output_error(grams_GxFxF, w_FxD, parts, uses, rows) -> float:
    """Relative squared error of the refit FFN output against the dense output over all groups
    (sum_g ||h_g[:, cols] W' - h_g W||^2 / sum_g ||h_g W||^2), from the Gram matrices."""
    num = den = 0.0
    w = np.asarray(w_FxD, np.float64)
    for G, used in zip(grams_GxFxF, uses, strict=True):
        full = np.zeros_like(w)
        for i in used:
            full[parts[i]] += rows[i]
        d = full - w
        num += float(np.sum(d * (G @ d)))
        den += float(np.sum(w * (G @ w)))
    return num / den if den > 0 else math.nan


def first_rows(batches: Sequence[np.ndarray], n: int) -> list[np.ndarray]:
    """The first n rows of a domain's [b, S] calibration batches (the refit's subset)."""
    out, left = [], n
    for b in batches:
        if left <= 0:
            break
        out.append(np.asarray(b)[:left])
        left -= len(out[-1])
    return out


def refit_subset(
    batches: dict[str, Sequence[np.ndarray]], n: int
) -> dict[str, Sequence[np.ndarray]]:
    """The refit's calibration rows: the first n rows of each domain's batches (0 = all)."""
    return {d: first_rows(bs, n) for d, bs in batches.items()} if n else batches
