"""The train stage: alternating router / expert distillation rounds, checkpoints, baselines.

  run_training(c, run_dir)   (called by launch/train.py)

Reads RUN/moe_init/ (refactor stage) and the dense teacher named by c.model.checkpoint; writes
  RUN/train/<kind>/ckpt/          orbax train-state checkpoints (resume with --config.resume=True)
  RUN/train/<kind>/metrics.jsonl  one record per step
  RUN/train/summary.{json,md}     per phase: tokens, tokens/s, FLOP/s, losses
  RUN/moe_router/                 Read-ME after the first router phase (router trained only)
  RUN/moe_trained/                the trained Read-ME model (save_readme)
  RUN/baseline_layerwise/, RUN/baseline_static/   baselines, same data and backbone tokens
  RUN/snapshots/<output>_<tokens>/  each model at the expert-phase token counts of train.snapshots

The pieces: train/context.py loads what every model kind shares (`build_context`),
train/variants.py builds each kind's starting point (`make_variant`), train/step.py the jitted
step, train/summary.py the tables. This module runs the schedule: `Phase` (a compiled step per
kind x phase) and `_Run` (one kind's state, data position, checkpoints and logs).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import shutil
import time
import warnings
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from tqdm.auto import tqdm

import readme_jax.train.distributed as dist
import readme_jax.train.step as steplib
from readme_jax.checkpoints import models
from readme_jax.data import make_iterator
from readme_jax.refactor.reconstruct import STATIC_REFIT_FILE
from readme_jax.train.checkpoint import TrainCheckpoints
from readme_jax.train.config import TrainConfig, resolve
from readme_jax.train.context import (
    Context,
    TrainingError,
    build_context,
    pipeline_config,
    place,
    saved_layout,
    training_layout,
    union_mask,
)
from readme_jax.train.flops import measure_matmul_flops, step_flops_per_token
from readme_jax.train.mesh import global_batch, replicated, state_shardings
from readme_jax.train.summary import summarize, summary_table
from readme_jax.train.variants import Variant, make_variant

OUTPUTS = {"readme": "moe_trained", "layerwise": "baseline_layerwise", "static": "baseline_static"}

# ---------------------------------------------------------------- compiled steps
_STEPS: dict[Any, Any] = {}
# TrainConfig fields that do not change the compiled step (the LR peak is an argument)
_HOST_ONLY = (
    "rounds",
    "router_lr",
    "expert_lr",
    "lr_decay",
    "save_every",
    "keep",
    "baselines",
    "stop_after",
    "save_router_snapshot",
    "num_threads",
)


def _step_key(setup: steplib.Setup, mesh, abstract_state) -> Any:
    tc = dataclasses.replace(setup.tc, **{k: getattr(TrainConfig(), k) for k in _HOST_ONLY})
    leaves, treedef = jax.tree.flatten(abstract_state)
    shapes = tuple((a.shape, str(a.dtype), a.sharding.spec) for a in leaves)
    return dataclasses.replace(setup, tc=tc), mesh, treedef, shapes


class Phase:
    """One phase ("router" or "expert") of one model kind: its jitted step (compiled once per
    kind x phase x shapes in this process, donating the state), parameter labels, optimizer,
    and FLOPs per token.

    `params_abstract` holds ShapeDtypeStructs with shardings (the placed parameters). The step
    is `state, metrics = phase.step(state, consts, batch, lr_peak)` with consts
    {"teacher": dense params on the mesh, "union": `context.union_mask(ctx)`}."""

    def __init__(self, ctx: Context, var: Variant, phase: str, params_abstract):
        tc = ctx.tc
        mcfg = var.setup_kw.get("mcfg")
        ep = bool(mcfg) and ctx.mesh.shape["expert"] > 1
        self.setup = steplib.Setup(kind=var.kind, phase=phase, expert_parallel=ep, **var.setup_kw)
        self.labels = steplib.labels(params_abstract, var.kind, phase, tc.expert_params)
        self.tx = steplib.make_optimizer(tc, phase, self.labels)
        abstract = self.abstract_state(params_abstract, ctx.mesh)
        self.shardings = jax.tree.map(lambda a: a.sharding, abstract)
        key = _step_key(self.setup, ctx.mesh, abstract)
        if key not in _STEPS:  # runs in one process (baselines, tests) share compiled steps
            fn = steplib.make_step(self.setup, self.tx, self.labels, ctx.mesh)
            _STEPS[key] = jax.jit(fn, donate_argnums=(0,), out_shardings=(self.shardings, None))
        self.step = _STEPS[key]
        s = self.setup
        self.flops_per_token = step_flops_per_token(
            phase,
            var.kind,
            s.cfg,
            s.teacher_cfg,
            var.active_ffn_width,
            tc.seq_len,
            expert_params=tc.expert_params,
            rcfg=s.rcfg,
            num_experts=ctx.model.spec.num_experts,
        )

    def abstract_state(self, params_abstract, mesh):
        """The train state's ShapeDtypeStructs with their shardings on `mesh`."""
        st = jax.eval_shape(lambda p: steplib.init_state(p, self.tx, self.labels), params_abstract)
        sh = state_shardings(st, mesh)
        return jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), st, sh)

    def fresh_state(self, params):
        """A new train state (fresh optimizer state) for `params`, placed on the mesh."""
        st = steplib.init_state(params, self.tx, self.labels)
        return jax.device_put(st, self.shardings)


# ---------------------------------------------------------------- metrics records
def _host(met: dict) -> dict:
    out = {}
    for k, v in dist.to_host(met).items():
        a = np.asarray(v)
        out[k] = a.tolist() if a.ndim else float(a)
    return out


def _record(met: dict, base: dict, domains: list[str]) -> dict:
    rec = dict(base)
    n = met.pop("tokens", 0.0) or 1.0
    for k in ("loss", "ce", "kl", "top1_agree", "grad_norm"):
        if k in met:
            rec[k] = met[k]
    for k in ("entropy", "router_acc"):
        if k in met:
            rec[k] = met[k] / n
    if "load" in met:
        load = np.asarray(met["load"])
        rec["load"] = {
            d: (load[i] / max(load[i].sum(), 1)).round(4).tolist()
            for i, d in enumerate(domains)
            if load[i].sum() > 0
        }
    return rec


def _rewrite_metrics(path: Path, upto_step: int) -> None:
    """Drop records after the restored step (they are recomputed identically on resume)."""
    if not path.exists() or not dist.is_primary():
        return
    lines = [ln for ln in path.read_text().splitlines() if ln.strip()]
    keep = [ln for ln in lines if json.loads(ln)["step"] <= upto_step]
    tmp = path.with_suffix(".tmp")
    tmp.write_text("".join(ln + "\n" for ln in keep))
    tmp.replace(path)


def init_fingerprint(run: Path, kind: str) -> str:
    """What a model kind's training starts from, as a string kept in every training checkpoint:
    the refactored model's save time (RUN/moe_init/model.json), and for the static baseline the
    hash of its refit rows (or "none"). A checkpoint whose fingerprint differs was trained from
    other starting weights (e.g. the refit added after it), so resuming it is refused."""
    moe_init = run / "moe_init"
    meta = moe_init / "model.json"
    saved = json.loads(meta.read_text()).get("saved_at", "?") if meta.exists() else "?"
    out = f"moe_init saved {saved}"
    if kind == "static":
        f = moe_init / STATIC_REFIT_FILE
        digest = hashlib.sha256(f.read_bytes()).hexdigest()[:16] if f.exists() else "none"
        out += f"; static refit {digest}"
    return out


# ---------------------------------------------------------------- one model kind
class _Run:
    """One model kind's pass through the schedule: state, data position, checkpoints, logs."""

    def __init__(self, ctx: Context, kind: str):
        self.ctx, self.kind, self.tc = ctx, kind, ctx.tc
        self.wdir = ctx.run / "train" / kind
        self.metrics = self.wdir / "metrics.jsonl"
        self.sched = self.tc.schedule()
        self.var = make_variant(ctx, kind)
        self.params = place(self.var.params, ctx.mesh)
        del self.var.params
        self.p_abs = jax.tree.map(
            lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=a.sharding), self.params
        )
        teacher = steplib.cast_params(  # stored once in the compute dtype
            training_layout(ctx.teacher, ctx.model.rc.model.scan_layers), self.tc.compute_dtype
        )
        union = dist.put_global(union_mask(ctx), replicated(ctx.mesh))
        self.consts = {"teacher": place(teacher, ctx.mesh), "union": union}
        self.phases: dict[str, Phase] = {}
        self.ckpts = TrainCheckpoints(self.wdir / "ckpt", self.tc.keep)
        self.init_id = init_fingerprint(ctx.run, kind)
        self.pos = {"phase_index": 0, "phase_step": 0, "global_step": 0, "data": None}
        self.state = None
        self.done_this_run = 0
        self.snaps = self.tc.snapshot_steps()  # {global step: expert tokens}

    def snapshot(self, params: dict, tokens: int) -> None:
        """The model after `tokens` expert-phase tokens -> RUN/snapshots/<output>_<tokens>/."""
        out = snapshot_dir(self.ctx.run, self.kind, tokens)
        if not models.exists(out):
            _save(self.ctx, self.kind, params, out, f"{tokens} expert tokens", tokens)

    def export_snapshots(self) -> None:
        """Requested snapshots not on disk yet, from the starting point (0 tokens) or the
        train-state checkpoint of their step; a step whose checkpoint is gone is named in a
        warning (keep more with train.keep, or rerun with the snapshot requested)."""
        kept = set(self.ckpts.steps())
        for g, tokens in sorted(self.snaps.items()):
            if models.exists(snapshot_dir(self.ctx.run, self.kind, tokens)):
                continue
            if g == 0:  # the starting point (rebuilt once training has consumed it)
                if self.params is None:
                    self.params = place(make_variant(self.ctx, self.kind).params, self.ctx.mesh)
                self.snapshot(self.params, 0)
            elif g in kept:
                self.snapshot(self.ckpts.restore_step(g, self._abstract_state)["params"], tokens)
            else:
                warnings.warn(
                    f"{self.kind}: no snapshot at {tokens} expert tokens: the train-state "
                    f"checkpoint of step {g} is not kept in {self.wdir / 'ckpt'} (kept: "
                    f"{sorted(kept) or 'none'})",
                    stacklevel=2,
                )

    def phase(self, name: str) -> Phase:
        if name not in self.phases:
            self.phases[name] = Phase(self.ctx, self.var, name, self.p_abs)
        return self.phases[name]

    def _abstract_state(self, meta: dict) -> Any:
        """The train state's shapes and shardings at a checkpoint's record (its phase's
        optimizer state)."""
        ph = self.phase(self.sched[meta["phase_index"]][1])
        return ph.abstract_state(self.p_abs, self.ctx.mesh)

    def restore(self) -> None:
        """Continue from the newest checkpoint that restores (metrics after it are dropped)."""
        got = self.ckpts.restore_latest(self._abstract_state)
        if got is None:
            if dist.is_primary():
                self.metrics.unlink(missing_ok=True)
            return
        g, self.state, meta = got
        if meta.get("init", self.init_id) != self.init_id:  # older checkpoints carry none
            raise TrainingError(
                f"{self.wdir / 'ckpt'} (step {g}) was trained from other starting weights "
                f"({meta['init']}) than this run's ({self.init_id}), e.g. a refit added or "
                f"recomputed since; remove {self.wdir} to train {self.kind} from the new ones"
            )
        self.pos.update({k: meta[k] for k in self.pos})
        self.params = None
        _rewrite_metrics(self.metrics, g)
        rnd, phase, _ = self.sched[self.pos["phase_index"]]
        where = f"round {rnd + 1}, {phase} phase, step {self.pos['phase_step']}"
        print(f"[train] {self.kind}: resumed from step {g} ({where})")

    def run(self) -> bool:
        """Train to the end of the schedule; False if stopped early (train.stop_after)."""
        it = make_iterator(
            pipeline_config(self.ctx), self.ctx.tokenizer, self.ctx.cache, state=self.pos["data"]
        )
        for pi in range(self.pos["phase_index"], len(self.sched)):
            rnd, phase, n = self.sched[pi]
            start = self.pos["phase_step"] if pi == self.pos["phase_index"] else 0
            if start >= n:  # a phase-end checkpoint: go on with the next phase
                continue
            per_step = self.tc.phase_batch(phase) // self.tc.data_batch
            if self.kind == "static" and phase == "router":  # no router: skip the same batches
                for _ in range((n - start) * per_step):
                    next(it)
                g = self.pos["global_step"] + n - start
                self.pos.update(phase_index=pi + 1, phase_step=0, global_step=g)
                continue
            if not self.run_phase(it, pi, start, per_step):
                return False
            snapshot = self.kind == "readme" and phase == "router" and rnd == 0
            if snapshot and self.tc.save_router_snapshot:
                out = self.ctx.run / "moe_router"
                _save(self.ctx, "readme", self.state["params"], out, "router_phase_1")
        return True

    def run_phase(self, it, pi: int, start: int, per_step: int) -> bool:
        rnd, phase, n = self.sched[pi]
        ph = self.phase(phase)
        if self.state is None or start == 0:  # each phase starts with fresh optimizer state
            params = self.params if self.state is None else self.state["params"]
            self.state, self.params = ph.fresh_state(params), None
        lr_peak = jnp.float32(self.tc.peak_lr(phase, rnd))
        desc = f"{self.kind} r{rnd + 1}/{self.tc.rounds} {phase}"
        bar_kw = dict(total=n, initial=start, desc=desc, dynamic_ncols=True)
        with tqdm(**bar_kw, disable=not dist.is_primary()) as bar:
            for ps in range(start, n):
                rows = [next(it) for _ in range(per_step)]
                host = {k: np.concatenate([r[k] for r in rows]) for k in rows[0]}
                batch = global_batch(host, self.ctx.mesh)
                t0 = time.perf_counter()
                self.state, met = ph.step(self.state, self.consts, batch, lr_peak)
                met = _host(met)
                dt = time.perf_counter() - t0
                self.check_finite(met["loss"], pi, ps)
                self.pos.update(
                    phase_index=pi,
                    phase_step=ps + 1,
                    global_step=self.pos["global_step"] + 1,
                    data=it.get_state(),
                )
                rec = self.log(met, pi, ps, ps == start, dt, ph.flops_per_token)
                bar.set_postfix(loss=f"{rec['loss']:.4f}", tok_s=f"{rec['tok_s']:.0f}")
                bar.update(1)
                g = self.pos["global_step"]
                if ps + 1 == n or (self.tc.save_every and g % self.tc.save_every == 0):
                    self.ckpts.save(g, self.state, dict(self.pos) | {"init": self.init_id})
                if g in self.snaps:
                    self.snapshot(self.state["params"], self.snaps[g])
                self.done_this_run += 1
                if self.tc.stop_after and self.done_this_run >= self.tc.stop_after:
                    n_done = self.done_this_run
                    print(f"[train] {self.kind}: stopping after {n_done} steps (train.stop_after)")
                    return False
        return True

    def check_finite(self, loss: float, pi: int, ps: int) -> None:
        if math.isfinite(loss):
            return
        rnd, phase, _ = self.sched[pi]
        last = self.ckpts.steps()
        raise TrainingError(
            f"{self.kind}: loss is {loss} at step {self.pos['global_step'] + 1} (round {rnd + 1}, "
            f"{phase} phase, step {ps + 1}); nothing was saved after the last good checkpoint "
            f"({self.wdir / 'ckpt' / str(last[-1]) if last else 'none'}). Lower "
            f"train.{phase}_lr (or train.clip_norm), then rerun with --config.resume=True"
        )

    def log(self, met: dict, pi: int, ps: int, first: bool, dt: float, fpt: float) -> dict:
        rnd, phase, _ = self.sched[pi]
        ntok = self.tc.tokens_per_step(phase)
        lr = self.tc.peak_lr(phase, rnd) * float(steplib.schedule_value(self.tc, phase, ps))
        base = {
            "variant": self.kind,
            "round": rnd,
            "phase": phase,
            "step": self.pos["global_step"],
            "phase_step": ps + 1,
            "lr": lr,
            "tokens": ntok,
            "dt": dt,
            "first": first,
            "tok_s": ntok / dt,
            "flops_s": fpt * ntok / dt,
            "time": time.time(),
        }
        rec = _record(met, base, self.ctx.domains)
        if dist.is_primary():
            with self.metrics.open("a") as f:
                f.write(json.dumps(rec) + "\n")
        return rec


def train_variant(ctx: Context, kind: str) -> dict:
    """Train one model kind through the whole schedule and save it; returns its summary."""
    out_dir = ctx.run / OUTPUTS[kind]
    wdir = ctx.run / "train" / kind
    if ctx.c.resume and models.exists(out_dir):
        print(f"[train] {out_dir} exists; skipping {kind} (resume)")
        if ctx.tc.snapshots and _missing_snapshots(ctx, kind):
            run = _Run(ctx, kind)
            try:
                run.export_snapshots()
            finally:
                run.ckpts.close()
        return summarize(wdir / "metrics.jsonl", ctx.peak_flops)
    if not ctx.c.resume and wdir.exists() and dist.is_primary():
        shutil.rmtree(wdir)
    dist.barrier(f"fresh {kind}")
    wdir.mkdir(parents=True, exist_ok=True)
    run = _Run(ctx, kind)
    try:
        if 0 in run.snaps:  # the starting point, before a restore replaces it
            run.snapshot(run.params, 0)
        if ctx.c.resume:
            run.restore()
        elif dist.is_primary():
            run.metrics.unlink(missing_ok=True)
        if not run.run():
            return {"stopped": True, "step": run.pos["global_step"]}
        _save(
            ctx,
            kind,
            run.state["params"],
            out_dir,
            "trained",
            max(ctx.tc.expert_tokens_at().values()),
        )
        run.export_snapshots()  # any a resumed run could not save on its way
    finally:
        run.ckpts.close()
    return summarize(run.metrics, ctx.peak_flops)


def snapshot_dir(run: Path, kind: str, tokens: int) -> Path:
    """Where model `kind` after `tokens` expert-phase tokens is saved (train.snapshots)."""
    return Path(run) / "snapshots" / f"{OUTPUTS[kind]}_{tokens}"


def _missing_snapshots(ctx: Context, kind: str) -> bool:
    return any(not models.exists(snapshot_dir(ctx.run, kind, t)) for t in ctx.tc.snapshots)


def _save(
    ctx: Context, kind: str, params: dict, out: Path, stage: str, tokens: int | None = None
) -> None:
    """Save a trained kind's params as a model directory; `tokens` = its expert-phase tokens
    (model.json "expert_tokens"; the full schedule's for the final model)."""
    params = dist.to_host(saved_layout(params))  # every process joins the gather
    if not dist.is_primary():
        return
    recipe = ctx.model.meta.get("recipe")
    extra = {"stage": stage, "train": dataclasses.asdict(ctx.tc), "recipe": recipe}
    if tokens is not None:
        extra["expert_tokens"] = int(tokens)
    if kind == "static":
        ffn_dim = int(jax.tree.leaves(params["layers"]["w_down"])[0].shape[1])
        cfg = ctx.teacher_cfg.replace(ffn_dim=ffn_dim)
        models.save_dense(out, params, cfg, extra)
    else:
        rc = ctx.model.rc
        if kind == "layerwise":
            rc = rc.replace(moe=dataclasses.replace(rc.moe, layerwise=True))
        models.save_readme(out, params, rc, ctx.model.spec, extra)
    print(f"[train] {kind} ({stage}) -> {out}")


# ---------------------------------------------------------------- the stage
def run_training(c: Any, run_dir: Path, *, tokenizer=None, teacher=None) -> dict:
    """The train stage. tokenizer/teacher (cfg, params) may be passed in to skip loading.
    Returns the summary per model kind, or {"stopped": True, "step": g} when train.stop_after
    ended it early. Raises TrainingError (see build_context, `_Run.check_finite`)."""
    tc = resolve(c)
    run_dir = Path(run_dir)
    ctx = build_context(c, run_dir, tc, tokenizer, teacher)
    ctx.peak_flops = measure_matmul_flops()
    kinds = ["readme", *tc.baselines]
    tok_r, tok_e = tc.tokens_per_step("router"), tc.tokens_per_step("expert")
    budget = tc.rounds * (tc.router_steps * tok_r + tc.expert_steps * tok_e)
    print(
        f"[train] {', '.join(kinds)}: {tc.rounds} rounds x (router {tc.router_steps} x {tok_r} + "
        f"expert {tc.expert_steps} x {tok_e} tokens) = {budget} tokens per model; "
        f"mesh {dict(ctx.mesh.shape)}"
    )
    summary = {}
    for kind in kinds:
        res = train_variant(ctx, kind)
        if res.get("stopped"):
            return res
        summary[kind] = res
    summary["peak_matmul_flops"] = ctx.peak_flops
    if not dist.is_primary():
        return summary
    out = run_dir / "train"
    out.mkdir(parents=True, exist_ok=True)
    (out / "summary.json").write_text(json.dumps(summary, indent=2))
    table = summary_table({k: v for k, v in summary.items() if isinstance(v, dict)}, ctx.peak_flops)
    (out / "summary.md").write_text(table)
    print(table)
    return summary
