"""The train stage: alternating router / expert distillation rounds, checkpoints, baselines.

  run_training(c, run_dir)   (called by launch/train.py)

Reads RUN/moe_init/ (refactor stage) and the dense teacher named by c.model.checkpoint; writes
  RUN/train/<kind>/ckpt/          orbax train-state checkpoints (resume with --config.resume=True)
  RUN/train/<kind>/metrics.jsonl  one record per step
  RUN/train/summary.{json,md}     per phase: tokens, tokens/s, FLOP/s, losses
  RUN/moe_router/                 Read-ME after the first router phase (router trained only)
  RUN/moe_trained/                the trained Read-ME model (save_readme)
  RUN/baseline_layerwise/, RUN/baseline_static/   baselines, same data and backbone tokens
"""

from __future__ import annotations

import dataclasses
import json
import math
import shutil
import time
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from tqdm.auto import tqdm

from readme_jax.checkpoints import store
from readme_jax.model import llama
from readme_jax.model.config import LlamaConfig
from readme_jax.refactor import convert as cv
from readme_jax.refactor.experts import active_ffn_fraction, expert_channel_masks
from readme_jax.train import distributed as dist
from readme_jax.train import flops, losses
from readme_jax.train import mesh as meshlib
from readme_jax.train import step as steplib
from readme_jax.train.checkpoint import TrainCheckpoints
from readme_jax.train.config import TrainConfig, resolve

OUTPUTS = {"readme": "moe_trained", "layerwise": "baseline_layerwise", "static": "baseline_static"}


class TrainingError(RuntimeError):
    """Training cannot go on (non-finite loss, missing inputs); the message says what to do."""


@dataclasses.dataclass
class Context:
    """Everything a variant's training needs, loaded once."""

    c: Any
    run: Path
    tc: TrainConfig
    mesh: Any
    model: cv.ReadMEModel  # the refactored, untrained Read-ME model
    teacher_cfg: LlamaConfig
    teacher: dict  # dense params, layers stacked
    tokenizer: Any
    domains: list[str]
    cache: str | None
    peak_flops: float = 0.0


# ---------------------------------------------------------------- setup
def _layout(params: dict, scan: bool) -> dict:
    """Training layout: per-layer lists unless layers are scanned (see llama.unstack_layers)."""
    return llama.stack_layers(params) if scan else llama.unstack_layers(params)


def _saved_layout(tree: Any) -> Any:
    if isinstance(tree, dict):
        out = {k: _saved_layout(v) for k, v in tree.items()}
        return llama.stack_layers(out) if isinstance(out.get("layers"), list) else out
    return tree


def build_context(c: Any, run: Path, tc: TrainConfig, tokenizer=None, teacher=None) -> Context:
    moe_dir = run / "moe_init"
    if not (moe_dir / "model.json").exists():
        raise TrainingError(
            f"{moe_dir} not found: run the calibrate and refactor stages first "
            f"(--config.stages=calibrate,refactor,train)"
        )
    model = cv.load_readme(moe_dir)
    if teacher is None or tokenizer is None:
        cfg, dense, tok = cv.load_dense(
            c.model.checkpoint, c.model.dtype, model.rc.model.scan_layers, c.seed
        )
        teacher = teacher or (cfg, dense)
        tokenizer = tokenizer or tok
    tcfg, dense = teacher
    domains = cv.parse_domains(c.data.domains)
    if list(domains) != list(model.spec.domains):
        raise TrainingError(
            f"c.data.domains {list(domains)} differ from the experts' domains "
            f"{model.spec.domains} in {moe_dir}; use the domains the model was refactored with"
        )
    from readme_jax.data import prepare_domains

    cache = c.data.cache or None
    _, errors = prepare_domains(dict(domains), cache=cache)
    if errors:
        raise TrainingError("training data unavailable: " + "; ".join(
            f"{k}: {v}" for k, v in errors.items()))  # fmt: skip
    mesh = meshlib.mesh_from_config(c)
    shards = mesh.shape["data"] * mesh.shape["fsdp"]
    for phase in ("router", "expert"):
        rows = tc.phase_batch(phase) // tc.accum(phase)
        if rows % shards:
            raise TrainingError(
                f"the {phase} phase's (micro-)batch of {rows} sequences cannot be split over "
                f"data x fsdp = {shards} devices; change train.batch_size / train.micro_batch or "
                f"--config.mesh.*"
            )
    return Context(c, run, tc, mesh, model, tcfg, llama.stack_layers(dense), tokenizer,
                   list(domains), cache)  # fmt: skip


@dataclasses.dataclass
class Variant:
    kind: str
    params: dict  # initial parameters, training layout
    setup_kw: dict
    active_ffn_width: float


def make_variant(ctx: Context, kind: str) -> Variant:
    rc, spec, tc = ctx.model.rc, ctx.model.spec, ctx.tc
    scan = rc.model.scan_layers
    F = ctx.teacher_cfg.ffn_dim
    width = active_ffn_fraction(spec, F, rc.moe.top_k) * F
    kw = dict(teacher_cfg=ctx.teacher_cfg, tc=tc, n_domains=len(ctx.domains))
    if kind == "readme":
        params = {"backbone": _layout(ctx.model.params["backbone"], scan),
                  "router": ctx.model.params["router"]}  # fmt: skip
        kw.update(cfg=rc.model, mcfg=rc.moe, rcfg=rc.router)
    elif kind == "layerwise":
        params = {"backbone": _layout(ctx.model.params["backbone"], scan)}
        kw.update(cfg=rc.model, mcfg=dataclasses.replace(rc.moe, layerwise=True), rcfg=rc.router)
    elif kind == "static":
        from readme_jax.refactor.experts import static_pruned_params
        from readme_jax.refactor.stats import ActivationStats

        calib = ctx.run / "calib"
        if not (calib / "stats.json").exists():
            raise TrainingError(f"{calib} not found: the static baseline needs the calibrate stage")
        stats = ActivationStats.load(calib)
        dense, w = static_pruned_params(ctx.teacher, stats.mean_abs_ExLxF, width / F)
        params = _layout(dense, scan)
        width = float(w)
        kw.update(cfg=ctx.teacher_cfg.replace(ffn_dim=w, scan_layers=scan))
    else:
        raise TrainingError(f"unknown model kind {kind!r}; choose from {steplib.KINDS}")
    return Variant(kind, params, kw, width)


def _union(ctx: Context) -> jax.Array:
    shared, experts = expert_channel_masks(ctx.model.spec, ctx.teacher_cfg.ffn_dim)
    return losses.union_masks(shared * ctx.tc.target_shared, experts)


def _place(tree: Any, mesh) -> Any:
    """Copies on the mesh: the train step donates its state, and the loaded model's arrays are
    still needed (baselines start from the same experts)."""
    return dist.put_global(tree, meshlib.param_shardings(tree, mesh))


def _pipeline_cfg(ctx: Context):
    from readme_jax.data import PipelineConfig

    tc = ctx.tc
    return PipelineConfig(
        domains=tuple(ctx.domains), seq_len=tc.seq_len, batch_size=tc.data_batch,
        split="train", seed=ctx.c.seed, num_threads=tc.num_threads, prefetch=4,
    )  # fmt: skip


# ---------------------------------------------------------------- one variant
_STEPS: dict[Any, Any] = {}
# TrainConfig fields that do not change the compiled step (the LR peak is an argument)
_HOST_ONLY = ("rounds", "router_lr", "expert_lr", "lr_decay", "save_every", "keep", "baselines",
              "stop_after", "save_router_snapshot", "num_threads")  # fmt: skip


def _step_key(setup: steplib.Setup, mesh, abstract_state) -> Any:
    tc = dataclasses.replace(setup.tc, **{k: getattr(TrainConfig(), k) for k in _HOST_ONLY})
    leaves, treedef = jax.tree.flatten(abstract_state)
    shapes = tuple((a.shape, str(a.dtype), a.sharding.spec) for a in leaves)
    return dataclasses.replace(setup, tc=tc), mesh, treedef, shapes


class _Phase:
    """A phase's compiled step, labels and optimizer (one compile per kind x phase)."""

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
        self.flops_per_token = flops.step_flops_per_token(
            phase, var.kind, s.cfg, s.teacher_cfg, var.active_ffn_width, tc.seq_len,
            tc.expert_params, s.rcfg, ctx.model.spec.num_experts,
        )  # fmt: skip

    def abstract_state(self, params_abstract, mesh):
        st = jax.eval_shape(lambda p: steplib.init_state(p, self.tx, self.labels), params_abstract)
        sh = meshlib.state_shardings(st, mesh)
        return jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), st, sh)

    def fresh_state(self, params):
        st = steplib.init_state(params, self.tx, self.labels)
        return jax.device_put(st, self.shardings)


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
        rec["load"] = {d: (load[i] / max(load[i].sum(), 1)).round(4).tolist()
                       for i, d in enumerate(domains) if load[i].sum() > 0}  # fmt: skip
    return rec


def _rewrite_metrics(path: Path, upto_step: int) -> None:
    """Drop records after the restored step (they are recomputed identically on resume)."""
    if not path.exists() or not dist.is_primary():
        return
    keep = [ln for ln in path.read_text().splitlines()
            if ln.strip() and json.loads(ln)["step"] <= upto_step]  # fmt: skip
    tmp = path.with_suffix(".tmp")
    tmp.write_text("".join(ln + "\n" for ln in keep))
    tmp.replace(path)


class _Run:
    """One model kind's pass through the schedule: state, data position, checkpoints, logs."""

    def __init__(self, ctx: Context, kind: str):
        self.ctx, self.kind, self.tc = ctx, kind, ctx.tc
        self.wdir = ctx.run / "train" / kind
        self.metrics = self.wdir / "metrics.jsonl"
        self.sched = self.tc.schedule()
        self.var = make_variant(ctx, kind)
        self.params = _place(self.var.params, ctx.mesh)
        del self.var.params
        self.p_abs = jax.tree.map(
            lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=a.sharding), self.params
        )
        teacher = steplib.cast_params(  # stored once in the compute dtype
            _layout(ctx.teacher, ctx.model.rc.model.scan_layers), self.tc.compute_dtype
        )
        union = dist.put_global(_union(ctx), meshlib.replicated(ctx.mesh))
        self.consts = {"teacher": _place(teacher, ctx.mesh), "union": union}
        self.phases: dict[str, _Phase] = {}
        self.ckpts = TrainCheckpoints(self.wdir / "ckpt", self.tc.keep)
        self.pos = {"phase_index": 0, "phase_step": 0, "global_step": 0, "data": None}
        self.state = None
        self.done_this_run = 0

    def phase(self, name: str) -> _Phase:
        if name not in self.phases:
            self.phases[name] = _Phase(self.ctx, self.var, name, self.p_abs)
        return self.phases[name]

    def restore(self) -> None:
        """Continue from the newest checkpoint that restores (metrics after it are dropped)."""
        got = self.ckpts.restore_latest(
            lambda m: self.phase(self.sched[m["phase_index"]][1]).abstract_state(
                self.p_abs, self.ctx.mesh)
        )  # fmt: skip
        if got is None:
            if dist.is_primary():
                self.metrics.unlink(missing_ok=True)
            return
        g, self.state, meta = got
        self.pos.update({k: meta[k] for k in self.pos})
        self.params = None
        _rewrite_metrics(self.metrics, g)
        rnd, phase, _ = self.sched[self.pos["phase_index"]]
        print(f"[train] {self.kind}: resumed from step {g} (round {rnd + 1}, {phase} phase, "
              f"step {self.pos['phase_step']})")  # fmt: skip

    def run(self) -> bool:
        """Train to the end of the schedule; False if stopped early (train.stop_after)."""
        from readme_jax.data import make_iterator

        it = make_iterator(_pipeline_cfg(self.ctx), self.ctx.tokenizer, self.ctx.cache,
                           state=self.pos["data"])  # fmt: skip
        for pi in range(self.pos["phase_index"], len(self.sched)):
            rnd, phase, n = self.sched[pi]
            start = self.pos["phase_step"] if pi == self.pos["phase_index"] else 0
            if start >= n:  # a phase-end checkpoint: go on with the next phase
                continue
            per_step = self.tc.phase_batch(phase) // self.tc.data_batch
            if self.kind == "static" and phase == "router":  # no router: skip the same batches
                for _ in range((n - start) * per_step):
                    next(it)
                self.pos.update(phase_index=pi + 1, phase_step=0,
                                global_step=self.pos["global_step"] + n - start)  # fmt: skip
                continue
            if not self.run_phase(it, pi, start, per_step):
                return False
            if self.kind == "readme" and phase == "router" and rnd == 0:
                if self.tc.save_router_snapshot:
                    _save(self.ctx, "readme", self.state["params"], self.ctx.run / "moe_router",
                          "router_phase_1")  # fmt: skip
        return True

    def run_phase(self, it, pi: int, start: int, per_step: int) -> bool:
        rnd, phase, n = self.sched[pi]
        ph = self.phase(phase)
        if self.state is None or start == 0:  # each phase starts with fresh optimizer state
            params = self.params if self.state is None else self.state["params"]
            self.state, self.params = ph.fresh_state(params), None
        lr_peak = jnp.float32(self.tc.peak_lr(phase, rnd))
        desc = f"{self.kind} r{rnd + 1}/{self.tc.rounds} {phase}"
        with tqdm(total=n, initial=start, desc=desc, dynamic_ncols=True,
                  disable=not dist.is_primary()) as bar:  # fmt: skip
            for ps in range(start, n):
                rows = [next(it) for _ in range(per_step)]
                host = {k: np.concatenate([r[k] for r in rows]) for k in rows[0]}
                batch = meshlib.global_batch(host, self.ctx.mesh)
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
                rec = self.log(met, pi, ps, ps == start, dt, ph.flops_per_token)  # fmt: skip
                bar.set_postfix(loss=f"{rec['loss']:.4f}", tok_s=f"{rec['tok_s']:.0f}")
                bar.update(1)
                g = self.pos["global_step"]
                if ps + 1 == n or (self.tc.save_every and g % self.tc.save_every == 0):
                    self.ckpts.save(g, self.state, dict(self.pos))
                self.done_this_run += 1
                if self.tc.stop_after and self.done_this_run >= self.tc.stop_after:
                    print(f"[train] {self.kind}: stopping after {self.done_this_run} steps "
                          "(train.stop_after)")  # fmt: skip
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
        base = {"variant": self.kind, "round": rnd, "phase": phase,
                "step": self.pos["global_step"], "phase_step": ps + 1, "lr": lr, "tokens": ntok,
                "dt": dt, "first": first, "tok_s": ntok / dt, "flops_s": fpt * ntok / dt,
                "time": time.time()}  # fmt: skip
        rec = _record(met, base, self.ctx.domains)
        if dist.is_primary():
            with self.metrics.open("a") as f:
                f.write(json.dumps(rec) + "\n")
        return rec


def train_variant(ctx: Context, kind: str) -> dict:
    """Train one model kind through the whole schedule and save it; returns its summary."""
    out_dir = ctx.run / OUTPUTS[kind]
    wdir = ctx.run / "train" / kind
    if ctx.c.resume and (out_dir / "model.json").exists():
        print(f"[train] {out_dir} exists; skipping {kind} (resume)")
        return summarize(wdir / "metrics.jsonl", ctx)
    if not ctx.c.resume and wdir.exists() and dist.is_primary():
        shutil.rmtree(wdir)
    dist.barrier(f"fresh {kind}")
    wdir.mkdir(parents=True, exist_ok=True)
    run = _Run(ctx, kind)
    if ctx.c.resume:
        run.restore()
    elif dist.is_primary():
        run.metrics.unlink(missing_ok=True)
    if not run.run():
        return {"stopped": True, "step": run.pos["global_step"]}
    _save(ctx, kind, run.state["params"], out_dir, "trained")
    run.ckpts.close()
    return summarize(run.metrics, ctx)


def _save(ctx: Context, kind: str, params: dict, out: Path, stage: str) -> None:
    params = dist.to_host(_saved_layout(params))  # every process joins the gather
    if not dist.is_primary():
        return
    extra = {"stage": stage, "train": dataclasses.asdict(ctx.tc),
             "recipe": ctx.model.meta.get("recipe")}  # fmt: skip
    if kind == "static":
        cfg = ctx.teacher_cfg.replace(
            ffn_dim=int(jax.tree.leaves(params["layers"]["w_down"])[0].shape[1])
        )
        store.save_model(out, params, {"kind": "dense_llama", "config": cfg.to_dict(), **extra})
    else:
        rc = ctx.model.rc
        if kind == "layerwise":
            rc = rc.replace(moe=dataclasses.replace(rc.moe, layerwise=True))
        cv.save_readme(out, params, rc, ctx.model.spec, extra)
    print(f"[train] {kind} ({stage}) -> {out}")


# ---------------------------------------------------------------- summary
def summarize(metrics_path: Path, ctx: Context) -> dict:
    """Per phase kind: steps, tokens, steady-state tokens/s and FLOP/s, first/last loss."""
    if not metrics_path.exists():
        return {}
    recs = [json.loads(ln) for ln in metrics_path.read_text().splitlines() if ln.strip()]
    out: dict[str, Any] = {}
    for phase in ("router", "expert"):
        rs = [r for r in recs if r["phase"] == phase]
        if not rs:
            continue
        steady = [r for r in rs if not r["first"]] or rs
        dt = sum(r["dt"] for r in steady)
        tok = sum(r["tokens"] for r in steady)
        fl = sum(r["flops_s"] * r["dt"] for r in steady)
        last_round = max(r["round"] for r in rs)
        out[phase] = {
            "steps": len(rs),
            "tokens": sum(r["tokens"] for r in rs),
            "tok_s": tok / dt if dt else 0.0,
            "flops_s": fl / dt if dt else 0.0,
            "flops_frac": (fl / dt / ctx.peak_flops) if dt and ctx.peak_flops else None,
            "loss_first": rs[0]["loss"],
            "loss_last": [r for r in rs if r["round"] == last_round][-1]["loss"],
        }
        for k in ("router_acc", "kl", "ce", "top1_agree"):
            if k in rs[-1]:
                out[phase][f"{k}_last"] = rs[-1][k]
    return out


def _table(summary: dict, peak: float) -> str:
    head = "| model | phase | steps | tokens | tokens/s | GFLOP/s | of peak | loss first -> last |"
    lines = [f"Training summary (f32 matmul peak measured: {peak / 1e9:.1f} GFLOP/s)", "", head,
             "|---|---|---|---|---|---|---|---|"]  # fmt: skip
    for kind, s in summary.items():
        for phase, p in s.items():
            if not isinstance(p, dict):
                continue
            frac = f"{p['flops_frac']:.0%}" if p.get("flops_frac") else "-"
            loss = f"{p['loss_first']:.4f} -> {p['loss_last']:.4f}"
            lines.append(
                f"| {kind} | {phase} | {p['steps']} | {p['tokens']} | {p['tok_s']:.0f} | "
                f"{p['flops_s'] / 1e9:.1f} | {frac} | {loss} |"
            )
    return "\n".join(lines) + "\n"


def run_training(c: Any, run_dir: Path, *, tokenizer=None, teacher=None) -> dict:
    """The train stage. tokenizer/teacher (cfg, params) may be passed in to skip loading."""
    tc = resolve(c)
    run_dir = Path(run_dir)
    ctx = build_context(c, run_dir, tc, tokenizer, teacher)
    ctx.peak_flops = flops.measure_matmul_flops()
    kinds = ["readme", *tc.baselines]
    budget = tc.rounds * (
        tc.router_steps * tc.tokens_per_step("router")
        + tc.expert_steps * tc.tokens_per_step("expert")
    )
    print(f"[train] {', '.join(kinds)}: {tc.rounds} rounds x (router {tc.router_steps} x "
          f"{tc.tokens_per_step('router')} + expert {tc.expert_steps} x "
          f"{tc.tokens_per_step('expert')} tokens) = {budget} tokens per model; "
          f"mesh {dict(ctx.mesh.shape)}")  # fmt: skip
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
    table = _table({k: v for k, v in summary.items() if isinstance(v, dict)}, ctx.peak_flops)
    (out / "summary.md").write_text(table)
    print(table)
    return summary
