"""Training losses: routing distillation (paper Eq. 4), LM cross-entropy, KL to the teacher.

Routing target (refactor/targets.py, re-exported here): the normalised counts of a token's top
dense FFN channels inside each expert's channel set; the router is trained with
KL(target ‖ softmax(router logits)), the counts computed inside the frozen teacher's forward.

The LM head over a large vocabulary dominates the step, so `head_loss` computes CE and KL in
token chunks and forms the gradients in the same pass (a custom VJP): [T, V] logits exist one
chunk at a time, and the student head costs three matmuls, not four (no recompute).
"""

from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp

# The Eq. 4 routing target lives with the expert channel sets it counts; re-exported here.
from readme_jax.refactor.targets import (  # noqa: F401
    coverage_ffn,
    layer_coverage,
    normalize_counts,
    routing_targets,
    top_channel_mask,
    union_masks,
)

Params = dict[str, Any]


# ---------------------------------------------------------------- routing targets
def mix_domain_target(target_XxSxE: jax.Array, domain_BxS: jax.Array, weight: float) -> jax.Array:
    """(1 - weight) * target + weight * one-hot(domain): the router target moved towards the
    document's domain label (train.domain_target), [..., B, S, E] (leading axes broadcast,
    e.g. the layer-wise baseline's [L, B, S, E]). Needs one expert per domain, expert d = domain
    d (the refactor's domain experts); weight 0 returns `target` unchanged (Eq. 4 as in the
    paper); tokens of a domain with no expert (index >= E, `data.extra_domains`) keep `target`.
    Our option: at the `compare` budget the trained router's perplexity is
    12% above that of domain-oracle routing of the same experts
    (docs/logbook/training-recipe.md §7c),
    and a document's label is constant, so the target also asks for temporal locality."""
    if not weight:
        return target_XxSxE
    E = target_XxSxE.shape[-1]
    oh = jax.nn.one_hot(domain_BxS, E, dtype=target_XxSxE.dtype)
    # a domain without an expert of its own (data.extra_domains, index >= E) keeps the target
    labelled = jnp.sum(oh, -1, keepdims=True)
    return target_XxSxE + weight * (oh - labelled * target_XxSxE)


# ---------------------------------------------------------------- routing losses and metrics
def routing_kl(target_BxSxE, logits_BxSxE, mask_BxS) -> jax.Array:
    """Mean over unmasked tokens of KL(target ‖ softmax(logits))."""
    logq = jax.nn.log_softmax(logits_BxSxE.astype(jnp.float32), axis=-1)
    p = target_BxSxE.astype(jnp.float32)
    kl = jnp.sum(jnp.where(p > 0, p * (jnp.log(jnp.where(p > 0, p, 1.0)) - logq), 0.0), -1)
    m = mask_BxS.astype(jnp.float32)
    return jnp.sum(kl * m) / jnp.maximum(jnp.sum(m), 1.0)


def routing_metrics(
    experts_BxS,
    domain_BxS,
    mask_BxS,
    n_domains: int,
    n_experts: int,
    logits_BxSxE=None,
    target_BxSxE=None,
) -> dict[str, jax.Array]:
    """Sums (divide by "tokens" on the host): router entropy, accuracy against the target's
    argmax, and the expert load per domain [n_domains, E] (token counts)."""
    m = mask_BxS.astype(jnp.float32)
    out = {"tokens": jnp.sum(m)}
    if logits_BxSxE is not None:
        logp = jax.nn.log_softmax(logits_BxSxE.astype(jnp.float32), axis=-1)
        out["entropy"] = jnp.sum(-jnp.sum(jnp.exp(logp) * logp, -1) * m)
    if target_BxSxE is not None:
        hit = experts_BxS == jnp.argmax(target_BxSxE, axis=-1)
        out["router_acc"] = jnp.sum(hit * m)
    oh_e = jax.nn.one_hot(experts_BxS, n_experts) * m[..., None]
    oh_d = jax.nn.one_hot(domain_BxS, n_domains)
    out["load"] = jnp.einsum("bsd,bse->de", oh_d, oh_e)
    return out


# ---------------------------------------------------------------- temporal locality
def consecutive_pairs(segment_ids_BxS) -> jax.Array:
    """1.0 where token t and token t-1 are in the same (non-padding) segment: [B, S-1]."""
    seg = jnp.asarray(segment_ids_BxS)
    return ((seg[:, 1:] == seg[:, :-1]) & (seg[:, 1:] > 0)).astype(jnp.float32)


def switch_penalty(logits_BxSxE, segment_ids_BxS, kind: str = "tv") -> jax.Array:
    """Locality term: mean over consecutive token pairs of one document of how much the
    router's distribution moves, scalar in [0, 1].

    kind "tv": total variation 0.5 * sum_e |p_t,e - p_t-1,e| (0 for any constant distribution,
    1 for a switch between one-hot experts); "overlap": 1 - <p_t, p_t-1> (0 only for the same
    one-hot expert; also pushes each p towards one-hot). Pairs that cross a document (segment)
    boundary or touch padding (segment id 0) are masked: a new document may change expert
    freely. Our addition (no published conversion method tunes the router for locality); it
    targets the serving cache, whose hits come from consecutive tokens keeping their expert.

    Raises:
      ValueError: unknown `kind`.
    """
    if kind not in ("tv", "overlap"):
        raise ValueError(f"switch_penalty kind must be 'tv' or 'overlap', got {kind!r}")
    p = jax.nn.softmax(logits_BxSxE.astype(jnp.float32), axis=-1)
    if kind == "tv":
        move = 0.5 * jnp.sum(jnp.abs(p[:, 1:] - p[:, :-1]), axis=-1)
    else:
        move = 1.0 - jnp.sum(p[:, 1:] * p[:, :-1], axis=-1)
    pairs = consecutive_pairs(segment_ids_BxS)
    return jnp.sum(move * pairs) / jnp.maximum(jnp.sum(pairs), 1.0)


def temporal_locality(experts_BxS, segment_ids_BxS) -> tuple[jax.Array, jax.Array]:
    """(pairs keeping the previous token's expert, pairs) within documents: sums, so that
    batches add up; locality = kept / pairs (paper: 71% on its trained router)."""
    e = jnp.asarray(experts_BxS)
    pairs = consecutive_pairs(segment_ids_BxS)
    kept = jnp.sum((e[:, 1:] == e[:, :-1]).astype(jnp.float32) * pairs)
    return kept, jnp.sum(pairs)


# ---------------------------------------------------------------- LM head losses
def _chunks(x, n, c):
    pad = n * c - x.shape[0]
    x = jnp.pad(x, [(0, pad)] + [(0, 0)] * (x.ndim - 1))
    return x.reshape(n, c, *x.shape[1:])


def _logits(h_CxD, w, transposed):
    spec = "cd,dv->cv" if transposed else "cd,vd->cv"
    return jnp.einsum(spec, h_CxD, w, preferred_element_type=jnp.float32)


def _chunk_terms(h, w, th, tw, y, wt, cfg):
    """Per-chunk loss sums and dL/dlogits (already weighted), for CE and/or KL to teacher."""
    lm_w, kd_w, temp, transposed = cfg
    z = _logits(h, w, transposed)
    ls = jax.nn.log_softmax(z, axis=-1)
    ce = -jnp.take_along_axis(ls, y[:, None], axis=-1)[:, 0]
    onehot = jnp.arange(z.shape[-1])[None, :] == y[:, None]
    gz = lm_w * (jnp.exp(ls) - onehot)
    sums = {"ce": jnp.sum(ce * wt)}
    if kd_w:
        zt = _logits(th, tw, transposed)
        lt = jax.nn.log_softmax(zt / temp, axis=-1)
        lsT = jax.nn.log_softmax(z / temp, axis=-1) if temp != 1.0 else ls
        pt = jnp.exp(lt)
        kl = jnp.sum(pt * (lt - lsT), axis=-1) * temp**2
        gz = gz + kd_w * temp * (jnp.exp(lsT) - pt)
        sums["kl"] = jnp.sum(kl * wt)
        agree = jnp.argmax(z, -1) == jnp.argmax(zt, -1)
        sums["top1_agree"] = jnp.sum(agree * wt)
    sums["loss"] = lm_w * sums["ce"] + kd_w * sums.get("kl", 0.0)
    return sums, gz * wt[:, None]


def _head_scan(h, w, th, tw, y, wt, chunk, cfg, with_grads, need_w_grad):
    T, D = h.shape
    n = -(-T // chunk)
    xs = tuple(_chunks(a, n, chunk) for a in (h, th, y, wt))
    w32 = w.astype(jnp.float32)

    def body(dw, x):
        hc, thc, yc, wc = x
        sums, gz = _chunk_terms(hc, w, thc, tw, yc, wc, cfg)
        if not with_grads:
            return dw, (sums, None)
        transposed = cfg[3]
        dh = (gz @ w32.T if transposed else gz @ w32).astype(h.dtype)
        if need_w_grad:
            hc32 = hc.astype(jnp.float32)
            dw = dw + (hc32.T @ gz if transposed else gz.T @ hc32)
        return dw, (sums, dh)

    dw0 = jnp.zeros(w.shape, jnp.float32) if (with_grads and need_w_grad) else None
    dw, (sums, dh) = jax.lax.scan(body, dw0, xs)
    sums = jax.tree.map(jnp.sum, sums)
    if with_grads:
        dh = dh.reshape(n * chunk, D)[:T]
    return sums, dh, dw


@functools.partial(jax.custom_vjp, nondiff_argnums=(6, 7, 8))
def _head_loss(h, w, th, tw, y, wt, chunk, cfg, need_w_grad):
    sums, _, _ = _head_scan(h, w, th, tw, y, wt, chunk, cfg, False, need_w_grad)
    return sums["loss"], sums


def _head_fwd(h, w, th, tw, y, wt, chunk, cfg, need_w_grad):
    sums, dh, dw = _head_scan(h, w, th, tw, y, wt, chunk, cfg, True, need_w_grad)
    return (sums["loss"], sums), (dh, dw, w)


def _head_bwd(chunk, cfg, need_w_grad, res, ct):
    dh, dw, w = res
    g = ct[0]
    dw_out = (dw * g).astype(w.dtype) if need_w_grad else jnp.zeros_like(w)
    return ((dh * g.astype(dh.dtype)), dw_out, None, None, None, None)


_head_loss.defvjp(_head_fwd, _head_bwd)


def head_loss(
    h_TxD: jax.Array,
    w_head: jax.Array,
    targets_T: jax.Array,
    weight_T: jax.Array,
    *,
    teacher_h_TxD: jax.Array | None = None,
    teacher_w_head: jax.Array | None = None,
    lm_weight: float = 1.0,
    kd_weight: float = 0.0,
    temperature: float = 1.0,
    transposed: bool = False,
    chunk: int = 512,
    need_w_grad: bool = True,
) -> tuple[jax.Array, dict[str, jax.Array]]:
    """sum_t weight_t * (lm_weight * CE_t + kd_weight * T^2 * KL(teacher_t ‖ student_t) at
    temperature T), and the weighted sums of "ce", "kl", "top1_agree" (student vs teacher argmax).

    w_head is [V, D] (tied embedding) or [D, V] with transposed=True. Differentiable in h_TxD and
    w_head (w_head's gradient is skipped, and reported as zero, with need_w_grad=False)."""
    kd = float(kd_weight) if teacher_h_TxD is not None else 0.0
    th = teacher_h_TxD if teacher_h_TxD is not None else h_TxD
    tw = teacher_w_head if teacher_w_head is not None else w_head
    cfg = (float(lm_weight), kd, float(temperature), bool(transposed))
    chunk = int(min(chunk, h_TxD.shape[0]))
    return _head_loss(
        h_TxD,
        w_head,
        jax.lax.stop_gradient(th),
        jax.lax.stop_gradient(tw),
        targets_T.astype(jnp.int32),
        weight_T.astype(jnp.float32),
        chunk,
        cfg,
        bool(need_w_grad),
    )


def reference_head_loss(
    h_TxD,
    w_head,
    targets_T,
    weight_T,
    *,
    teacher_h_TxD=None,
    teacher_w_head=None,
    lm_weight=1.0,
    kd_weight=0.0,
    temperature=1.0,
    transposed=False,
):
    """The same loss with full [T, V] logits and plain autodiff (tests)."""
    z = _logits(h_TxD, w_head, transposed)
    ls = jax.nn.log_softmax(z, -1)
    ce = -jnp.take_along_axis(ls, targets_T[:, None], -1)[:, 0]
    loss = lm_weight * jnp.sum(ce * weight_T)
    if teacher_h_TxD is not None and kd_weight:
        lt = jax.nn.log_softmax(_logits(teacher_h_TxD, teacher_w_head, transposed) / temperature)
        lsT = jax.nn.log_softmax(z / temperature, -1)
        kl = jnp.sum(jnp.exp(lt) * (lt - lsT), -1) * temperature**2
        loss = loss + kd_weight * jnp.sum(kl * weight_T)
    return loss


# ---------------------------------------------------------------- layer-local distillation


def prefix_counts(counts_BxSxE: jax.Array, segment_ids_BxS: jax.Array) -> jax.Array:
    """Coverage counts summed over each token's causal prefix within its document (packed rows:
    a new segment id starts a new sum), [B, S, E]: the routing target of context-clustered
    experts, which a pre-gating router (it sees the same prefix) can follow."""
    c = jnp.cumsum(counts_BxSxE, axis=1)
    seg = segment_ids_BxS
    start = jnp.concatenate([jnp.ones_like(seg[:, :1], bool), seg[:, 1:] != seg[:, :-1]], axis=1)
    S = seg.shape[1]
    first = jax.lax.cummax(jnp.where(start, jnp.arange(S)[None], 0), axis=1)  # segment start
    before = jnp.take_along_axis(c - counts_BxSxE, first[..., None], axis=1)
    return c - before
