"""Compile the train steps on abstract arrays and print the per-device memory estimate.

  dry_run(c)   (launch/train.py --config.dry_run=True)

No weights are read or allocated: parameter, optimizer and batch shapes are ShapeDtypeStructs
carrying their mesh shardings, and each step is `jit(...).lower(...).compile()`d. Expert widths
are not known before calibration; the dry run assumes a shared expert of `shared_frac` x F and
private experts of remain_rate x F minus that (the active width is remain_rate x F either way).
"""

from __future__ import annotations

import functools
import time
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

import readme_jax.train.mesh as meshlib
import readme_jax.train.step as steplib
from readme_jax.checkpoints import models
from readme_jax.checkpoints.gguf import config_from_gguf, default_gguf_path, open_gguf
from readme_jax.data.pipeline import BATCH_KEYS
from readme_jax.model import llama
from readme_jax.model.config import ConfigError, LlamaConfig, MoEConfig, RouterConfig
from readme_jax.model.router import init_router
from readme_jax.refactor.pipeline import parse_domains
from readme_jax.train.config import resolve


def model_config(c: Any) -> LlamaConfig:
    """The dense model's config without loading weights."""
    ck = str(c.model.checkpoint)
    over = {"dtype": c.model.dtype, "scan_layers": c.model.scan_layers}
    if ck.startswith("random:"):
        return models.random_config(ck, **over)
    if ck == "" or ck.endswith(".gguf"):
        return config_from_gguf(open_gguf(ck or default_gguf_path()), **over)
    if (Path(ck) / "config.json").exists():
        return LlamaConfig.from_hf(Path(ck) / "config.json", **over)
    if "hf_config" in c.model:
        print(f"[dry run] {ck} not found; using the model shape in config.model.hf_config")
        return LlamaConfig.from_hf(dict(c.model.hf_config), **over)
    raise ConfigError(
        f"model.checkpoint {ck!r} has no config.json and config.model.hf_config "
        "is not set: the dry run needs the model's shape"
    )


def _sds(shape, dtype) -> jax.ShapeDtypeStruct:
    return jax.ShapeDtypeStruct(tuple(int(x) for x in shape), dtype)


def abstract_params(
    cfg: LlamaConfig, E: int, rcfg: RouterConfig, remain: float, shared_frac: float
) -> tuple[dict, dict]:
    """(Read-ME params, dense teacher params) as ShapeDtypeStructs (layers stacked)."""
    dt = jnp.bfloat16 if cfg.dtype == "bfloat16" else jnp.float32
    shapes = llama.param_shapes(cfg)
    is_shape = lambda s: isinstance(s, tuple)
    dense = jax.tree.map(lambda s: _sds(s, dt), shapes, is_leaf=is_shape)
    L, D, F = cfg.n_layers, cfg.dim, cfg.ffn_dim
    Fs = int(round(shared_frac * F))
    Fe = max(1, int(round(remain * F)) - Fs)
    layers = {k: v for k, v in dense["layers"].items() if k not in ("w_gate_up", "w_down")}
    layers.update(
        shared_gate_up=_sds((L, D, 2, Fs), dt),
        shared_down=_sds((L, Fs, D), dt),
        expert_gate_up=_sds((L, E, D, 2, Fe), dt),
        expert_down=_sds((L, E, Fe, D), dt),
        gate=_sds((L, D, E), dt),
    )
    router = jax.eval_shape(lambda k: init_router(rcfg, cfg, E, k), jax.random.key(0))
    return {"backbone": {**dense, "layers": layers}, "router": router}, dense


def _with_shardings(tree, shardings):
    return jax.tree.map(
        lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), tree, shardings
    )


def _per_device_bytes(tree) -> int:
    total = 0
    for a in jax.tree.leaves(tree):
        shard = a.sharding.shard_shape(a.shape) if a.sharding is not None else a.shape
        total += int(np.prod(shard)) * np.dtype(a.dtype).itemsize
    return total


def _gib(n: float) -> str:
    return f"{n / 2**30:.2f} GiB"


def dry_run(c: Any, shared_frac: float = 0.25) -> dict[str, dict[str, float]]:
    """Compile the router and expert steps of the Read-ME model; print and return, per phase,
    the per-device memory estimate (bytes) from XLA's memory analysis."""
    tc = resolve(c)
    mesh = meshlib.mesh_from_config(c)
    cfg = model_config(c)
    E = len(parse_domains(c.data.domains))
    rcfg = RouterConfig(c.router.dim, c.router.n_heads, c.router.ffn_dim)
    mcfg = MoEConfig(E, c.moe.top_k, c.moe.gate_scaling, c.moe.dispatch)
    remain = float(c.refactor.remain_rate)
    params, teacher = abstract_params(cfg, E, rcfg, remain, shared_frac)
    if not cfg.scan_layers:
        params = jax.eval_shape(
            lambda p: {**p, "backbone": llama.unstack_layers(p["backbone"])}, params
        )
        teacher = jax.eval_shape(llama.unstack_layers, teacher)
    params = _with_shardings(params, meshlib.param_shardings(params, mesh))
    teacher = jax.eval_shape(lambda t: steplib.cast_params(t, tc.compute_dtype), teacher)
    teacher = _with_shardings(teacher, meshlib.param_shardings(teacher, mesh))
    union = jax.ShapeDtypeStruct(
        (cfg.n_layers, cfg.ffn_dim, E), jnp.float32, sharding=meshlib.replicated(mesh)
    )
    consts = {"teacher": teacher, "union": union}
    print(
        f"[dry run] {c.name}: {cfg.param_count() / 1e9:.2f}B dense params, {E} experts, "
        f"mesh {dict(mesh.shape)} on {len(mesh.devices.flat)} {jax.devices()[0].platform} "
        f"devices; shared expert {shared_frac:.2f}F (assumed), remain rate {remain}"
    )
    out = {}
    for phase in ("router", "expert"):
        s = steplib.Setup(
            kind="readme",
            phase=phase,
            cfg=cfg,
            teacher_cfg=cfg,
            tc=tc,
            n_domains=E,
            mcfg=mcfg,
            rcfg=rcfg,
            expert_parallel=mesh.shape["expert"] > 1,
        )
        label_tree = steplib.labels(params, "readme", phase, tc.expert_params)
        tx = steplib.make_optimizer(tc, phase, label_tree)
        st = jax.eval_shape(
            functools.partial(steplib.init_state, tx=tx, label_tree=label_tree), params
        )
        st = _with_shardings(st, meshlib.state_shardings(st, mesh))
        B, S = tc.phase_batch(phase), tc.seq_len
        bsh = meshlib.batch_sharding(mesh)
        batch = {
            k: jax.ShapeDtypeStruct(
                (B, S), jnp.float32 if k == "loss_mask" else jnp.int32, sharding=bsh
            )
            for k in BATCH_KEYS
        }
        fn = steplib.make_step(s, tx, label_tree, mesh)
        t0 = time.time()
        shardings = jax.tree.map(lambda a: a.sharding, st)
        lowered = jax.jit(fn, donate_argnums=(0,), out_shardings=(shardings, None)).lower(
            st, consts, batch, jax.ShapeDtypeStruct((), jnp.float32)
        )
        compiled = lowered.compile()
        m = compiled.memory_analysis()
        rec = {
            "compile_s": time.time() - t0,
            "params_opt_bytes": _per_device_bytes(st),
            "teacher_bytes": _per_device_bytes(teacher),
            "argument_bytes": getattr(m, "argument_size_in_bytes", 0),
            "output_bytes": getattr(m, "output_size_in_bytes", 0),
            "alias_bytes": getattr(m, "alias_size_in_bytes", 0),
            "temp_bytes": getattr(m, "temp_size_in_bytes", 0),
        }
        rec["peak_bytes"] = (
            rec["argument_bytes"] + rec["output_bytes"] - rec["alias_bytes"] + rec["temp_bytes"]
        )
        out[phase] = rec
        print(
            f"[dry run] {phase} step: batch {B} x {S} ({tc.accum(phase)} micro-batches), "
            f"compiled in {rec['compile_s']:.1f}s; per device: params+optimizer "
            f"{_gib(rec['params_opt_bytes'])}, teacher {_gib(rec['teacher_bytes'])}, "
            f"temporaries {_gib(rec['temp_bytes'])}, estimated peak {_gib(rec['peak_bytes'])}"
        )
    return out
