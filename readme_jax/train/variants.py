"""The starting points of the models the train stage trains (`make_variant`):

readme     the refactored Read-ME model: pre-gating router + MoE backbone (RUN/moe_init)
layerwise  baseline: the same experts, one linear gate per layer instead of the router
static     baseline: the dense teacher pruned to the MoE's active FFN width by calibration
           statistics (RUN/calib), no routing
"""

from __future__ import annotations

import dataclasses

from readme_jax.refactor.experts import active_ffn_fraction, static_pruned_params
from readme_jax.refactor.pipeline import StaticControl
from readme_jax.refactor.reconstruct import apply_static_refit
from readme_jax.refactor.stats import ActivationStats
from readme_jax.train.context import Context, TrainingError, training_layout
from readme_jax.train.step import KINDS


@dataclasses.dataclass
class Variant:
    """A model kind's initial parameters (training layout), the `step.Setup` fields that
    describe it, and its active FFN width per token (channels, for FLOP counts)."""

    kind: str
    params: dict
    setup_kw: dict
    active_ffn_width: float


def make_variant(ctx: Context, kind: str) -> Variant:
    """The starting point of model `kind` (one of step.KINDS). Raises TrainingError for an
    unknown kind, or for `static` when the calibrate stage's statistics are missing."""
    rc, spec, tc = ctx.model.rc, ctx.model.spec, ctx.tc
    scan = rc.model.scan_layers
    F = ctx.teacher_cfg.ffn_dim
    width = active_ffn_fraction(spec, F, rc.moe.top_k) * F
    kw = dict(teacher_cfg=ctx.teacher_cfg, tc=tc, n_domains=len(ctx.domains))
    backbone = ctx.model.params["backbone"]
    if kind == "readme":
        params = {
            "backbone": training_layout(backbone, scan),
            "router": ctx.model.params["router"],
        }
        kw.update(cfg=rc.model, mcfg=rc.moe, rcfg=rc.router)
    elif kind == "layerwise":
        params = {"backbone": training_layout(backbone, scan)}
        kw.update(cfg=rc.model, mcfg=dataclasses.replace(rc.moe, layerwise=True), rcfg=rc.router)
    elif kind == "static":
        control = StaticControl.load(ctx.run / "moe_init")
        if control is not None:  # built by the recipe: same channel rule and refit as Read-ME
            dense, w = control.params(ctx.teacher)
        else:
            dense, w = _static_from_stats(ctx, width / F)
        params = training_layout(dense, scan)
        width = float(w)
        kw.update(cfg=ctx.teacher_cfg.replace(ffn_dim=w, scan_layers=scan))
    else:
        raise TrainingError(f"unknown model kind {kind!r}; choose from {KINDS}")
    return Variant(kind, params, kw, width)


def _static_from_stats(ctx: Context, frac: float) -> tuple[dict, int]:
    """Run directories refactored before the recipe saved its static control: the
    domain-averaged mean |h| rule on RUN/calib and the refit rows in RUN/moe_init, if any."""
    calib = ctx.run / "calib"
    if not (calib / "stats.json").exists():
        raise TrainingError(f"{calib} not found: the static baseline needs the calibrate stage")
    stats = ActivationStats.load(calib)
    dense, w = static_pruned_params(ctx.teacher, stats.mean_abs_ExLxF, frac)
    # the same refit as Read-ME's experts (a fair baseline), never silently without it
    refit = ctx.model.meta.get("reconstruct", {}).get("mode", "none") != "none"
    try:
        dense = apply_static_refit(ctx.run / "moe_init", dense, required=refit)
    except FileNotFoundError as e:
        raise TrainingError(str(e)) from None
    return dense, w
