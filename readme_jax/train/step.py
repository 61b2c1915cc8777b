"""One jitted train step per (model kind, phase): labels, optimizer, losses, gradient accumulation.

Model kinds: "readme" (pre-gating router + MoE backbone), "layerwise" (MoE with one gate per
layer, the baseline) and "static" (the statically pruned dense baseline). Phases: "router"
(routers trained by routing distillation, everything else frozen) and "expert" (the backbone
trained with KL to the teacher + LM loss, routers frozen).

Frozen parameters are neither differentiated nor updated: the loss is a function of the
trainable leaves only (frozen leaves are `optax.MaskedNode` in the gradient tree), and
`optax.partition` gives them `set_to_zero` with no optimizer state. The peak learning rate of a
round is an argument, so one compiled step serves every round.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import optax

import readme_jax.train.losses as losses
from readme_jax.model import llama, moe, readme
from readme_jax.model.config import LlamaConfig, MoEConfig, ReadMEConfig, RouterConfig
from readme_jax.model.router import router_logits
from readme_jax.train.config import TrainConfig

Params = dict[str, Any]
KINDS = ("readme", "layerwise", "static")
FFN_KEYS = ("shared_gate_up", "shared_down", "expert_gate_up", "expert_down", "w_gate_up", "w_down")
MEAN_KEYS = ("loss", "ce", "kl", "top1_agree")  # per-batch means; other metrics are sums
_is_masked = lambda x: isinstance(x, optax.MaskedNode)


@dataclasses.dataclass(frozen=True)
class Setup:
    """Everything static about a step: what model, which phase, which settings."""

    kind: str
    phase: str
    cfg: LlamaConfig  # the student's decoder config (static: the pruned FFN width)
    teacher_cfg: LlamaConfig
    tc: TrainConfig
    n_domains: int
    mcfg: MoEConfig | None = None
    rcfg: RouterConfig | None = None
    expert_parallel: bool = False


# ---------------------------------------------------------------- labels and optimizer
def _names(path) -> list[str]:
    return [str(getattr(k, "key", getattr(k, "idx", k))) for k in path]


def trainable(kind: str, phase: str, expert_params: str, path) -> bool:
    names = _names(path)
    leaf = names[-1]
    if phase == "router":
        return names[0] == "router" if kind == "readme" else leaf == "gate"
    if kind != "static" and names[0] != "backbone":
        return False
    if leaf == "gate":
        return False
    return leaf in FFN_KEYS if expert_params == "ffn" else True


def labels(params: Params, kind: str, phase: str, expert_params: str) -> Params:
    return jax.tree_util.tree_map_with_path(
        lambda p, _: "train" if trainable(kind, phase, expert_params, p) else "frozen", params
    )


def make_optimizer(tc: TrainConfig, phase: str, label_tree: Params) -> optax.GradientTransformation:
    """AdamW on the trainable leaves with a unit-peak cosine schedule over the phase (the
    round's peak LR scales the updates in the step), clipping by global norm."""
    steps = max(1, tc.phase_steps(phase))
    warm = int(round(tc.warmup_frac * steps))
    if warm:
        sched = optax.warmup_cosine_decay_schedule(0.0, 1.0, warm, steps, tc.min_lr_frac)
    else:
        sched = optax.cosine_decay_schedule(1.0, steps, tc.min_lr_frac)
    decay_mask = lambda p: jax.tree.map(lambda x: x.ndim >= 2, p)
    train = optax.chain(
        optax.clip_by_global_norm(tc.clip_norm) if tc.clip_norm > 0 else optax.identity(),
        optax.adamw(sched, b1=0.9, b2=0.95, weight_decay=tc.weight_decay, mask=decay_mask),
    )
    return optax.partition({"train": train, "frozen": optax.set_to_zero()}, label_tree)


def schedule_value(tc: TrainConfig, phase: str, count):
    steps = max(1, tc.phase_steps(phase))
    warm = int(round(tc.warmup_frac * steps))
    if warm:
        return optax.warmup_cosine_decay_schedule(0.0, 1.0, warm, steps, tc.min_lr_frac)(count)
    return optax.cosine_decay_schedule(1.0, steps, tc.min_lr_frac)(count)


def split_trainable(params: Params, label_tree: Params) -> Params:
    """The trainable view: frozen leaves replaced by MaskedNode (no leaves, no gradient)."""
    return jax.tree.map(lambda p, l: p if l == "train" else optax.MaskedNode(), params, label_tree)


def merge(view: Params, params: Params) -> Params:
    return jax.tree.map(lambda v, p: p if _is_masked(v) else v, view, params, is_leaf=_is_masked)


def init_state(params: Params, tx: optax.GradientTransformation, label_tree: Params) -> Params:
    return {"params": params, "opt": tx.init(split_trainable(params, label_tree))}


# ---------------------------------------------------------------- forward pieces
def cast_params(tree, dtype: str):
    """Matrices to bf16 for dtype='bfloat16' (norms and vectors stay f32)."""
    if dtype == "float32":
        return tree
    return jax.tree.map(
        lambda a: (
            a.astype(jnp.bfloat16) if jnp.issubdtype(a.dtype, jnp.floating) and a.ndim >= 2 else a
        ),
        tree,
    )


def _head(params: Params, cfg: LlamaConfig):
    """(w_head, transposed, leaf name): [V, D] tied embedding, or [D, V] lm_head."""
    if cfg.tie_embeddings:
        return params["embed"], False, "embed"
    return params["lm_head"], True, "lm_head"


def teacher_pass(s: Setup, consts: Params, b: Params):
    """Frozen dense teacher: final hidden [B, S, D] and per-layer coverage counts [L, B, S, E]
    (None for the static baseline, which has no experts)."""
    if s.kind == "static" or s.phase == "expert":  # targets are only needed to train routers
        ffn = llama.dense_ffn
    else:
        ffn = losses.coverage_ffn(consts["union"], s.tc.target_top_frac)
    teacher = cast_params(consts["teacher"], s.tc.compute_dtype)
    h, _, cov = llama.forward(
        teacher,
        b["tokens"],
        s.teacher_cfg,
        ffn=ffn,
        segment_ids_BxS=b["segment_ids"],
        positions_BxS=b["positions"],
        return_hidden=True,
    )
    return jax.lax.stop_gradient(h), (None if cov is None else jax.lax.stop_gradient(cov))


def _decoder(s: Setup, params: Params, b: Params, ffn):
    h, _, aux = llama.forward(
        params,
        b["tokens"],
        s.cfg,
        ffn=ffn,
        segment_ids_BxS=b["segment_ids"],
        positions_BxS=b["positions"],
        return_hidden=True,
        remat=s.tc.remat,
    )
    return h, aux


def student_hidden(s: Setup, params: Params, b: Params, routing, mesh):
    """Student final hidden [B, S, D] and per-layer aux (layer-wise gate logits or None)."""
    if s.kind == "static":
        return _decoder(s, params, b, llama.dense_ffn)
    mcfg = s.mcfg
    dispatch = moe.pick_dispatch(None, "train", model=mcfg.dispatch, override=s.tc.dispatch)
    mcfg = dataclasses.replace(mcfg, dispatch=dispatch)
    ffn = moe.moe_ffn(mcfg, routing, mesh if s.expert_parallel else None)
    return _decoder(s, params["backbone"], b, ffn)


def _route(s: Setup, params: Params, b: Params):
    rc = ReadMEConfig(s.cfg, s.mcfg, s.rcfg)
    logits, routing, _ = readme.route(params, b["tokens"], rc, b["segment_ids"])
    return logits, routing


# ---------------------------------------------------------------- losses per phase
def router_loss(s: Setup, params: Params, b: Params, cov, mesh):
    """Routing distillation; returns (loss, metric sums)."""
    mask = b["segment_ids"] > 0
    E = cov.shape[-1]
    if s.kind == "readme":
        logits, _ = router_logits(
            params["router"], b["tokens"], s.rcfg, s.cfg, segment_ids_BxS=b["segment_ids"]
        )
        counts = jnp.sum(cov, axis=0)
        if s.tc.target_prefix:
            counts = losses.prefix_counts(counts, b["segment_ids"])
        target = losses.normalize_counts(counts, s.tc.target_temperature)
        target = losses.mix_domain_target(target, b["domain"], s.tc.domain_target)
        loss = losses.routing_kl(target, logits, mask)
        if s.tc.locality_weight:  # temporal locality for the serving cache (H17)
            loss += s.tc.locality_weight * losses.switch_penalty(logits, b["segment_ids"])
        met = losses.routing_metrics(
            jnp.argmax(logits, -1), b["domain"], mask, s.n_domains, E, logits, target
        )
        return loss, met
    # layer-wise baseline: each layer's gate against that layer's own coverage target
    _, layer_logits = student_hidden(s, params, b, None, mesh)
    target = losses.normalize_counts(cov, s.tc.target_temperature)
    target = losses.mix_domain_target(target, b["domain"], s.tc.domain_target)
    L = cov.shape[0]
    loss = jnp.mean(jax.vmap(losses.routing_kl, in_axes=(0, 0, None))(target, layer_logits, mask))
    flat = lambda a: a.reshape(L * a.shape[1], *a.shape[2:])
    rep = lambda a: jnp.concatenate([a] * L, axis=0)
    met = losses.routing_metrics(
        jnp.argmax(flat(layer_logits), -1),
        rep(b["domain"]),
        rep(mask),
        s.n_domains,
        E,
        flat(layer_logits),
        flat(target),
    )
    return loss, met


def expert_loss(
    s: Setup,
    params: Params,
    b: Params,
    teacher: Params,
    t_hidden,
    cov,
    routing,
    router_logits_BxSxE,
    need_w: bool,
    mesh,
):
    """KL to the teacher + LM loss through the chunked head; returns (loss, metrics)."""
    tc = s.tc
    h, layer_logits = student_hidden(s, params, b, routing, mesh)
    student = params if s.kind == "static" else params["backbone"]
    w, transposed, _ = _head(student, s.cfg)
    tw, _, _ = _head(cast_params(teacher, tc.compute_dtype), s.teacher_cfg)
    B, S, D = h.shape
    lm = b["loss_mask"].reshape(-1).astype(jnp.float32)
    wt = lm / jnp.maximum(jnp.sum(lm), 1.0)
    loss, sums = losses.head_loss(
        h.reshape(B * S, D),
        w,
        b["targets"].reshape(-1),
        wt,
        teacher_h_TxD=t_hidden.reshape(B * S, D),
        teacher_w_head=tw,
        lm_weight=tc.lm_weight,
        kd_weight=tc.kd_weight,
        temperature=tc.temperature,
        transposed=transposed,
        chunk=tc.head_chunk,
        need_w_grad=need_w,
    )
    met = {k: v for k, v in sums.items() if k != "loss"}
    if s.kind != "static":  # routing load and entropy (accuracy is a router-phase metric)
        mask = b["segment_ids"] > 0
        if s.kind == "readme":
            experts, logits = routing[0][..., 0], router_logits_BxSxE
        else:  # layer-wise: report layer 0's routing
            logits = layer_logits[0]
            experts = jnp.argmax(logits, -1)
        met.update(
            losses.routing_metrics(
                experts, b["domain"], mask, s.n_domains, logits.shape[-1], logits
            )
        )
    return loss, met


# ---------------------------------------------------------------- the step
def _micro(batch: Params, A: int) -> Params:
    """[B, S] -> [A, B/A, S], micro-batch a = rows a, a+A, ... (keeps each device's rows local)."""
    return jax.tree.map(
        lambda x: jnp.swapaxes(x.reshape(x.shape[0] // A, A, *x.shape[1:]), 0, 1), batch
    )


def make_step(s: Setup, tx: optax.GradientTransformation, label_tree: Params, mesh=None):
    """step(state, consts, batch, lr_peak) -> (state, metrics). consts = {"teacher", "union"}."""
    tc = s.tc
    A = tc.accum(s.phase)
    head_leaf = "embed" if s.cfg.tie_embeddings else "lm_head"
    student_labels = label_tree if s.kind == "static" else label_tree.get("backbone", {})
    need_w = student_labels.get(head_leaf) == "train"

    def one(view, params, consts, b):
        t_hidden, cov = teacher_pass(s, consts, b)
        routing = r_logits = None
        if s.phase == "expert" and s.kind == "readme":
            r_logits, routing = _route(s, params, b)

        def loss_fn(v):
            full = cast_params(merge(v, params), tc.compute_dtype)
            if s.phase == "router":
                return router_loss(s, full, b, cov, mesh)
            return expert_loss(
                s, full, b, consts["teacher"], t_hidden, cov, routing, r_logits, need_w, mesh
            )

        (loss, met), g = jax.value_and_grad(loss_fn, has_aux=True)(view)
        return g, {**met, "loss": loss}

    def step(state, consts, batch, lr_peak):
        params = state["params"]
        view = split_trainable(params, label_tree)
        if A == 1:
            grads, met = one(view, params, consts, batch)
        else:
            mb = _micro(batch, A)

            def acc(carry, b):
                g, m = one(view, params, consts, b)
                return jax.tree.map(jnp.add, carry, (g, m)), None

            zeros = jax.eval_shape(
                lambda b: one(view, params, consts, b), jax.tree.map(lambda x: x[0], mb)
            )
            zeros = jax.tree.map(lambda x: jnp.zeros(x.shape, x.dtype), zeros)
            (grads, met), _ = jax.lax.scan(acc, zeros, mb)
            grads = jax.tree.map(lambda x: x / A, grads)
            met = {k: (v / A if k in MEAN_KEYS else v) for k, v in met.items()}
        grad_norm = optax.tree.norm(grads)
        updates, opt = tx.update(grads, state["opt"], view)
        lr = jnp.asarray(lr_peak, jnp.float32)
        new_params = jax.tree.map(
            lambda u, p: p if _is_masked(u) else (p + lr * u.astype(p.dtype)).astype(p.dtype),
            updates,
            params,
            is_leaf=_is_masked,
        )
        met["grad_norm"] = grad_norm
        return {"params": new_params, "opt": opt}, met

    return step
