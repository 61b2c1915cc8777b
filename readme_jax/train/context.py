"""What every model kind's training shares, loaded once: the `Context`, and the helpers that lay
its trees out for training.

  build_context(c, run_dir, tc)   the refactored Read-ME model, the dense teacher, the domains'
                                  data, the mesh (raises TrainingError when inputs are missing)
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import jax

import readme_jax.train.distributed as dist
from readme_jax.checkpoints import models
from readme_jax.data import PipelineConfig, prepare_domains
from readme_jax.errors import UserError
from readme_jax.model import llama
from readme_jax.model.config import LlamaConfig
from readme_jax.refactor.experts import expert_channel_masks
from readme_jax.refactor.pipeline import parse_domains
from readme_jax.train.config import TrainConfig
from readme_jax.train.losses import union_masks
from readme_jax.train.mesh import mesh_from_config, param_shardings


class TrainingError(UserError, RuntimeError):
    """Training cannot go on (non-finite loss, missing inputs); the message says what to do."""


@dataclasses.dataclass
class Context:
    """Everything a variant's training needs, loaded once."""

    c: Any
    run: Path
    tc: TrainConfig
    mesh: Any
    model: models.ReadMEModel  # the refactored, untrained Read-ME model
    # training domains: the experts' (index e = expert e), then data.extra_domains
    teacher_cfg: LlamaConfig
    teacher: dict  # dense params, layers stacked
    tokenizer: Any
    domains: list[str]
    cache: str | None
    peak_flops: float = 0.0


def training_layout(params: dict, scan: bool) -> dict:
    """Training layout of a model tree: layers stacked [L, ...] when they are scanned, else
    per-layer lists (see llama.unstack_layers)."""
    return llama.stack_layers(params) if scan else llama.unstack_layers(params)


def saved_layout(tree: Any) -> Any:
    """The on-disk layout: every "layers" list in the tree (nested too) stacked [L, ...]."""
    if isinstance(tree, dict):
        out = {k: saved_layout(v) for k, v in tree.items()}
        return llama.stack_layers(out) if isinstance(out.get("layers"), list) else out
    return tree


def place(tree: Any, mesh) -> Any:
    """Copies of `tree` on the mesh, sharded by the parameter rules (train/mesh.py). Copies, not
    aliases: the train step donates its state, and the loaded model's arrays are still needed
    (baselines start from the same experts)."""
    return dist.put_global(tree, param_shardings(tree, mesh))


def union_mask(ctx: Context) -> jax.Array:
    """The coverage target's channel masks, float [L, F, E] (see losses.union_masks): the dense
    FFN channels a token routed to expert e uses, its private ones and (weighted by
    train.target_shared) the shared expert's."""
    shared, experts = expert_channel_masks(ctx.model.spec, ctx.teacher_cfg.ffn_dim)
    return union_masks(shared * ctx.tc.target_shared, experts)


def parse_weights(spec: str, domains: list[str]) -> dict[str, float] | None:
    """ "chat=2,fiction=0.5" -> a weight per domain (unnamed domains 1); "" -> None (uniform).
    Raises TrainingError for an unknown domain or a value that is not a number >= 0."""
    if not spec or not spec.strip():
        return None
    out = dict.fromkeys(domains, 1.0)
    for part in [p.strip() for p in spec.split(",") if p.strip()]:
        name, _, val = part.partition("=")
        name = name.strip()
        if name not in out:
            raise TrainingError(f"data.weights names {name!r}, not one of the domains {domains}")
        try:
            out[name] = float(val)
        except ValueError:
            raise TrainingError(f"data.weights: {part!r} is not name=number") from None
        if not out[name] >= 0:
            raise TrainingError(f"data.weights: {name} must be >= 0, got {val}")
    return out


def pipeline_config(ctx: Context) -> PipelineConfig:
    """The training data pipeline: the context's domains (mixed by `data.weights`), train
    split, the run's seed."""
    tc = ctx.tc
    return PipelineConfig(
        domains=tuple(ctx.domains),
        weights=parse_weights(ctx.c.data.get("weights", ""), list(ctx.domains)),
        seq_len=tc.seq_len,
        batch_size=tc.data_batch,
        split="train",
        seed=ctx.c.seed,
        num_threads=tc.num_threads,
        prefetch=4,
    )


def build_context(c: Any, run: Path, tc: TrainConfig, tokenizer=None, teacher=None) -> Context:
    """Load RUN/moe_init, the dense teacher (unless `teacher` = (cfg, params) and `tokenizer`
    are given), prepare the domains' data and build the mesh. Raises TrainingError when the
    refactor stage has not run, the domains differ from the experts', data is missing, or a
    phase's batch cannot be split over the mesh."""
    moe_dir = run / "moe_init"
    if not models.exists(moe_dir):
        raise TrainingError(
            f"{moe_dir} not found: run the calibrate and refactor stages first "
            f"(--config.stages=calibrate,refactor,train)"
        )
    model = models.load_readme(moe_dir)
    if teacher is None or tokenizer is None:
        cfg, dense, tok = models.load_dense(
            c.model.checkpoint, c.model.dtype, model.rc.model.scan_layers, c.seed
        )
        teacher = teacher or (cfg, dense)
        tokenizer = tokenizer or tok
    tcfg, dense = teacher
    domains = parse_domains(c.data.domains)
    extra = {k: v for k, v in parse_extra(c).items() if k not in domains}
    recipe = model.meta.get("recipe", {})
    clustered = bool(recipe.get("clusters"))
    # clustered experts (refactor.clustering) are named cluster0..; their recipe names the data
    built_from = list(parse_domains(recipe["domains"])) if clustered else list(model.spec.domains)
    if list(domains) != built_from:
        raise TrainingError(
            f"c.data.domains {list(domains)} differ from the domains {built_from} the experts "
            f"in {moe_dir} were built from; use the domains the model was refactored with"
        )
    if clustered and tc.domain_target:
        raise TrainingError(
            f"train.domain_target={tc.domain_target} needs one expert per domain, but the experts "
            f"in {moe_dir} are k-means clusters (refactor.clustering); set it to 0"
        )
    cache = c.data.cache or None
    _, errors = prepare_domains({**domains, **extra}, cache=cache)
    if errors:
        missing = "; ".join(f"{k}: {v}" for k, v in errors.items())
        raise TrainingError(f"training data unavailable: {missing}")
    mesh = mesh_from_config(c)
    _check_batches(tc, mesh)
    return Context(
        c,
        run,
        tc,
        mesh,
        model,
        tcfg,
        llama.stack_layers(dense),
        tokenizer,
        [*domains, *extra],
        cache,
    )


def parse_extra(c: Any) -> dict[str, str | None]:
    """`data.extra_domains`: domains trained on without an expert (their pipeline index comes
    after the experts' domains, so the domain-label target leaves them to the coverage
    target)."""
    spec = c.data.get("extra_domains", "") or ""
    out: dict[str, str | None] = {}
    for part in [p.strip() for p in spec.split(",") if p.strip()]:
        name, _, path = part.partition("=")
        out[name] = path or None
    return out


def _check_batches(tc: TrainConfig, mesh) -> None:
    shards = mesh.shape["data"] * mesh.shape["fsdp"]
    for phase in ("router", "expert"):
        rows = tc.phase_batch(phase) // tc.accum(phase)
        if rows % shards:
            raise TrainingError(
                f"the {phase} phase's (micro-)batch of {rows} sequences cannot be split over "
                f"data x fsdp = {shards} devices; change train.batch_size / train.micro_batch or "
                f"--config.mesh.*"
            )
