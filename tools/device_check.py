"""The prepared accelerator check: what a CPU cannot measure, in one run of at most ~8 minutes.

  tools/device_check.sh                 # on the accelerator machine (writes under $OUT)
  tools/device_check.sh --smoke         # here, on CPU, tiny shapes, end to end

Randomly initialised models of stated shapes (no checkpoint travels): Llama-2-7B (bf16) and a
1B-class shape (TinyLlama-1.1B's), each refactored into E=8 experts at remain rate 0.5 with
`refactor.experts` (shared + private channels from random, partly shared channel scores). For
each shape, as the time budget allows (sections run in order of importance, and the report is
rewritten after each, so a run cut short still reports what it measured):

  probe      HBM copy bandwidth (device->device) and the bf16 matmul rate: the ceilings
  decode     dense vs Read-ME decode tokens/s at batch 1 and 8, all experts resident, next to
             the HBM bound (bytes a step must read / measured bandwidth); `decode.steps.DecodeModel`
  load       host->device expert load bandwidth from `pinned_host` (`OffloadedExpertStore`)
  cache      the serving engine (`serve.engine.Engine`) on one trace: on-demand vs prefetch at
             C = 2..6 with Belady and LRU, measured wall time beside the cost model's prediction
             (`serve.bench.costmodel.CostClock`) with the H200 datasheet and the measured
             bandwidths (last for a shape, in at most 60% of the time left)
  train      one MoE training step (forward + backward + SGD update): model FLOP utilisation
             (PaLM appendix B: 6 N_active + 12 L H hd S FLOPs per token)
Outputs: $OUT/device_check.json and $OUT/device_check.md (or --out DIR).
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import json
import os
import platform
import sys
import time
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np

from readme_jax.decode.steps import DecodeModel, dense_model, readme_model
from readme_jax.model import llama, readme
from readme_jax.model.config import LlamaConfig, MoEConfig, ReadMEConfig, RouterConfig
from readme_jax.refactor import experts as ex
from readme_jax.serve.backend import ModelBackend
from readme_jax.serve.bench import costmodel as cm
from readme_jax.serve.decode import split_params
from readme_jax.serve.engine import Engine, EngineConfig, ServeRequest
from readme_jax.serve.store import OffloadedExpertStore, memory_kinds

SHAPES = {  # vocab, width, layers, heads, kv heads, FFN width; router (dim, heads, ffn)
    "llama2-7b": dict(
        vocab=32000, dim=4096, layers=32, heads=32, kv=32, ffn=11008, router=(512, 8, 1024)
    ),
    "tinyllama-1.1b": dict(
        vocab=32000, dim=2048, layers=22, heads=32, kv=4, ffn=5632, router=(256, 4, 512)
    ),
    "smoke": dict(vocab=256, dim=64, layers=2, heads=4, kv=2, ffn=128, router=(32, 2, 64)),
}
H200_DATASHEET = {"hbm_bw": 4.8e12, "bf16_dense_flops": 989e12}  # NVIDIA H200 datasheet
NUM_EXPERTS, REMAIN_RATE = 8, 0.5


@dataclasses.dataclass
class Model:
    name: str
    cfg: LlamaConfig
    rc: ReadMEConfig
    dense: dict  # host params (numpy, bf16), layers stacked
    moe: dict  # {"backbone", "router"} host params
    spec: Any
    sp: Any = None  # serve.decode.ServeParams (set once by Models.get)


# ---------------------------------------------------------------- models
def _filler(n: int, dtype, seed: int):
    """Deterministic random values (std 0.02) for any shape: one prime-length buffer, tiled."""
    buf = (0.02 * np.random.default_rng(seed).standard_normal(4_194_301)).astype(dtype)

    def make(shape, key):
        if "norm" in key:
            return np.ones(shape, dtype)
        return np.resize(buf, int(np.prod(shape))).reshape(shape)

    return make


def _init(shapes: dict, make) -> dict:
    return {k: _init(v, make) if isinstance(v, dict) else make(v, k) for k, v in shapes.items()}


def build_model(name: str, dtype: str = "bfloat16", seed: int = 0) -> Model:
    """Random weights of the named shape, refactored into 8 experts at remain rate 0.5."""
    s = SHAPES[name]
    cfg = LlamaConfig(
        vocab_size=s["vocab"],
        dim=s["dim"],
        n_layers=s["layers"],
        n_heads=s["heads"],
        n_kv_heads=s["kv"],
        ffn_dim=s["ffn"],
        max_seq_len=4096,
        dtype=dtype,
        eos_ids=(2,),
        bos_id=1,
    )
    npdt = ml_dtypes.bfloat16 if dtype == "bfloat16" else np.float32
    make = _filler(0, npdt, seed)
    rc = ReadMEConfig(cfg, MoEConfig(NUM_EXPERTS, dispatch="select"), RouterConfig(*s["router"]))
    dense = _init(llama.param_shapes(cfg), make)
    router = _init(llama.param_shapes(rc.router.backbone(cfg)), make)
    rng = np.random.default_rng(seed)
    router["head"] = rng.standard_normal((rc.router.dim, NUM_EXPERTS)).astype(npdt)
    # channel scores: a part common to all experts (-> shared channels) plus per-expert noise
    L, F = cfg.n_layers, cfg.ffn_dim
    scores = rng.random((1, L, F)) + 0.7 * rng.random((NUM_EXPERTS, L, F))
    spec = ex.build_expert_spec(scores, REMAIN_RATE, [f"e{i}" for i in range(NUM_EXPERTS)])
    moe = {"backbone": ex.build_moe_params(dense, spec), "router": router}
    return Model(name, cfg, rc, dense, moe, spec)


def nbytes(tree) -> int:
    return int(
        sum(getattr(x, "nbytes", None) or np.asarray(x).nbytes for x in jax.tree.leaves(tree))
    )


# ---------------------------------------------------------------- probes
def _best(fn, reps: int) -> float:
    jax.block_until_ready(fn())
    best = float("inf")
    for _ in range(reps):
        t = time.perf_counter()
        jax.block_until_ready(fn())
        best = min(best, time.perf_counter() - t)
    return best


def probe(smoke: bool) -> dict:
    """HBM copy bandwidth (bytes read + written) and the bf16 matmul rate, best of 5."""
    n = (1 << 20) if smoke else (1 << 30)  # 2 MiB or 2 GiB of bf16
    x = jnp.ones((n,), jnp.bfloat16)
    copy = jax.jit(lambda a: a + jnp.bfloat16(1))
    t = _best(lambda: copy(x), 5)
    m = 256 if smoke else 8192
    a = jnp.ones((m, m), jnp.bfloat16)
    mm = jax.jit(lambda a: a @ a)
    tm = _best(lambda: mm(a), 5)
    return {
        "hbm_copy_bw": 2 * x.nbytes / t,
        "copy_bytes": 2 * x.nbytes,
        "bf16_matmul_flops": 2 * m**3 / tm,
        "matmul_n": m,
    }


# ---------------------------------------------------------------- decode
def _decode_rate(dm: DecodeModel, params, B: int, prompt: int, steps: int, vocab: int) -> dict:
    """Decode tokens/s of B rows after a prompt of `prompt` tokens (fed one per step too, so
    that one compiled step serves the whole run)."""
    cache = dm.new_cache(B, prompt + steps + 4)
    step = jax.jit(dm.step, donate_argnums=(2,))
    toks = jnp.asarray(np.random.default_rng(B).integers(3, vocab, (B, prompt)), jnp.int32)
    one = jnp.ones((B,), jnp.int32)
    for i in range(prompt):
        logits, cache = step(params, toks[:, i : i + 1], cache, one)
    nxt = jnp.argmax(logits[:, -1:], -1).astype(jnp.int32)
    jax.block_until_ready(nxt)
    t = time.perf_counter()
    for _ in range(steps):
        logits, cache = step(params, nxt, cache, one)
        nxt = jnp.argmax(logits[:, -1:], -1).astype(jnp.int32)
    jax.block_until_ready(nxt)
    dt = time.perf_counter() - t
    return {
        "batch": B,
        "steps": steps,
        "s_per_step": dt / steps,
        "tok_s": B * steps / dt,
        "context": prompt + steps,
    }


def decode_section(m: Model, bw: float, smoke: bool) -> dict:
    """Dense vs Read-ME (all experts resident, select dispatch) decode rates and HBM bounds."""
    mc = cm.model_cost(m.sp, m.name)
    prompt, steps = (4, 4) if smoke else (64, 32)
    dense_bytes = nbytes(m.dense) - (m.cfg.vocab_size - 1) * m.cfg.dim * 2  # one embedding row
    out = {"model_cost": mc.to_dict(), "rows": []}
    kinds = [("dense", dense_model(m.cfg), m.dense), ("readme", readme_model(m.rc), m.moe)]
    for kind, dm, host in kinds:
        params = jax.device_put(dm.prepare(host))
        for B in (1, 8):
            r = _decode_rate(dm, params, B, prompt, steps, m.cfg.vocab_size)
            kv = r["context"] * B * mc.kv_bytes_per_token
            if kind == "dense":
                need = dense_bytes + kv
            else:  # backbone + router + the distinct experts of B tokens (at most E)
                need = mc.dense_params * mc.dtype_bytes + min(B, NUM_EXPERTS) * mc.bytes_per_expert
                need += kv
            r |= {
                "model": kind,
                "bytes_per_step": need,
                "hbm_bound_tok_s": B * bw / need,
                "datasheet_bound_tok_s": B * H200_DATASHEET["hbm_bw"] / need,
            }
            r["fraction_of_bound"] = r["tok_s"] / r["hbm_bound_tok_s"]
            out["rows"].append(r)
        del params
        gc.collect()
    return out


# ---------------------------------------------------------------- expert loads
def load_section(m: Model) -> dict:
    """Host->device copies of whole experts (and of one layer of an expert)."""
    sp = m.sp
    out = {"memory_kinds": sorted(memory_kinds(jax.devices()[0]))}
    for name, axis in (("whole_expert", None), ("per_layer_store", 1)):
        store = OffloadedExpertStore(sp.experts, 2, layer_axis=axis)
        out["host_memory_kind"] = store.host_memory_kind or "numpy (no pinned_host)"
        store.load(0, 0, block=True)  # warm: compiles the slot update
        times = []
        for e in range(1, NUM_EXPERTS):
            t = time.perf_counter()
            store.load(e, e % 2, block=True)
            times.append(time.perf_counter() - t)
        med = float(np.median(times))
        out[name] = {
            "bytes_per_expert": store.bytes_per_expert,
            "median_s": med,
            "bytes_per_s": store.bytes_per_expert / med,
            "loads": len(times),
        }
        del store
        gc.collect()
    return out


# ---------------------------------------------------------------- engine + cost model
def make_trace(m: Model, n: int, prompt: int, new: int, seed: int = 0) -> list[ServeRequest]:
    """n requests of random token prompts, all arriving at t=0 (recorded in the report)."""
    rng = np.random.default_rng(seed)
    return [
        ServeRequest(i, rng.integers(3, m.cfg.vocab_size, prompt).tolist(), new, 0.0, seed=i)
        for i in range(n)
    ]


def _predict(steps: list[dict], hw: cm.Hardware, mc: cm.ModelCost, pipelined: bool) -> float:
    clk = cm.CostClock(hw, mc, pipelined=pipelined)
    t = 0.0
    for s in steps:
        t += clk.duration(s, 0.0, t)
    return t


def cache_section(m: Model, measured: dict, caps: list[int], smoke: bool, deadline: float):
    sp = m.sp
    mc = cm.model_cost(sp, m.name)
    n, prompt, new = (4, 8, 4) if smoke else (6, 32, 16)
    reqs = make_trace(m, n, prompt, new)
    base = EngineConfig(
        num_slots=8,
        max_len=prompt + new + 8,
        prefill_chunk=32,
        max_batch_tokens=64,
        batching="expert",
    )
    backend = ModelBackend.for_config(sp, base)
    hws = {"h200_datasheet": cm.h200(mc.layers)}
    if measured.get("hbm_copy_bw") and measured.get("link_bw"):
        hws["measured_bw"] = dataclasses.replace(
            hws["h200_datasheet"],
            name="H200 (measured bandwidths)",
            hbm_bw=measured["hbm_copy_bw"],
            link_bw=measured["link_bw"],
        )
    grid = [("all", NUM_EXPERTS, False)]
    grid += [(p, c, pf) for c in caps for p in ("belady", "lru") for pf in (False, True)]
    out = {
        "trace": [
            {"id": r.id, "prompt": list(r.prompt), "max_new_tokens": r.max_new_tokens} for r in reqs
        ],
        "engine": dataclasses.asdict(base),
        "runs": [],
    }
    warmed: set[int] = set()
    for pol, C, pf in grid:
        if time.monotonic() > deadline:
            out["cut_short"] = f"time budget reached before {pol} C={C} prefetch={pf}"
            break
        cfg = dataclasses.replace(base, cache_policy=pol, capacity=C, prefetch=pf)
        if C not in warmed:  # compile this capacity's steps outside the timed run
            Engine(backend, cfg).run([dataclasses.replace(reqs[0], max_new_tokens=2)])
            warmed.add(C)
        run = Engine(backend, cfg).run(reqs)
        s = run.summary()
        row = {"policy": pol, "capacity": C, "prefetch": pf}
        row |= {
            k: s[k]
            for k in (
                "makespan_s",
                "throughput_tok_s",
                "mean_norm_latency_s",
                "hit_ratio",
                "loads",
                "bytes_moved",
                "steps",
                "generated_tokens",
            )
        }
        for hname, hw in hws.items():
            row[f"predicted_s_{hname}"] = _predict(run.steps, hw, mc, pf)
        out["runs"].append(row)
    return out


# ---------------------------------------------------------------- training MFU
def train_section(m: Model, peak: float, smoke: bool) -> dict:
    """One jitted MoE training step (CE loss, grads, SGD update) on B x S random tokens."""
    B, S = (2, 16) if smoke else (4, 1024)
    rc = m.rc.replace(
        model=m.rc.model.replace(scan_layers=True),  # one layer to compile
        moe=dataclasses.replace(m.rc.moe, dispatch="ragged"),
    )
    params = jax.device_put(m.moe)

    def loss(p, toks):
        logits, _ = readme.readme_forward(p, toks[:, :-1], rc)
        lp = jax.nn.log_softmax(logits.astype(jnp.float32), -1)
        return -jnp.take_along_axis(lp, toks[:, 1:, None], -1).mean()

    @jax.jit
    def step(p, toks):
        g = jax.grad(loss)(p, toks)
        return jax.tree.map(lambda a, b: (a - 1e-4 * b.astype(a.dtype)).astype(a.dtype), p, g)

    toks = jnp.asarray(np.random.default_rng(0).integers(3, m.cfg.vocab_size, (B, S + 1)))
    params = step(params, toks)  # compile
    jax.block_until_ready(params)
    t = time.perf_counter()
    params = step(params, toks)
    jax.block_until_ready(params)
    dt = time.perf_counter() - t
    cfg, mc = m.cfg, cm.model_cost(m.sp, m.name)
    n_active = (
        cfg.n_layers * (mc.dense_layer_params + mc.expert_layer_params)
        + cfg.vocab_size * cfg.dim
        + mc.other_params
    )
    per_tok = 6 * n_active + 12 * cfg.n_layers * cfg.n_heads * cfg.head_dim * S
    flops = per_tok * B * S
    return {
        "batch": B,
        "seq": S,
        "step_s": dt,
        "active_params": n_active,
        "flops_per_token": per_tok,
        "model_flops_s": flops / dt,
        "mfu_vs_measured_matmul": flops / dt / peak,
        "mfu_vs_datasheet": flops / dt / H200_DATASHEET["bf16_dense_flops"],
    }


# ---------------------------------------------------------------- report
def _f(x, unit: str = "", scale: float = 1.0, d: int = 2) -> str:
    return "-" if x is None else f"{x / scale:.{d}f}{unit}"


def _cache_md(cache: dict) -> list[str]:
    """The engine grid: measured wall time beside each cost-model prediction."""
    runs, pre = cache["runs"], "predicted_s_"
    hws = [k.removeprefix(pre) for k in (runs[0] if runs else {}) if k.startswith(pre)]
    head = "| policy | C | prefetch | hit ratio | loads | measured s | tok/s | "
    lines = [head + " | ".join(f"predicted s ({h})" for h in hws) + " |", "|---" * (7 + len(hws))]
    for r in runs:
        pred = " | ".join(f"{r[pre + h]:.3f}" for h in hws)
        lines.append(
            f"| {r['policy']} | {r['capacity']} | {r['prefetch']} | "
            f"{r['hit_ratio']:.3f} | {r['loads']} | {r['makespan_s']:.3f} | "
            f"{r['throughput_tok_s']:.1f} | {pred} |"
        )
    if "cut_short" in cache:
        lines.append(f"\n({cache['cut_short']})")
    return [*lines, ""]


DECODE_HEAD = "| model | batch | tok/s | ms/step | HBM bound tok/s | of bound |"


def markdown(rep: dict) -> str:
    env = rep["env"]
    lines = [
        f"# Device check ({'smoke, CPU' if rep['smoke'] else env['device']})",
        "",
        f"{env['device']} x{env['device_count']}; jax {env['jax']}; {rep['command']}; "
        f"{rep.get('elapsed_s', 0):.0f} s",
        "",
    ]
    p = rep.get("probe")
    if p:
        lines += [
            f"Ceilings measured: HBM copy {_f(p['hbm_copy_bw'], ' GB/s', 1e9, 0)} "
            f"(datasheet {H200_DATASHEET['hbm_bw'] / 1e9:.0f}); bf16 matmul "
            f"{_f(p['bf16_matmul_flops'], ' TFLOP/s', 1e12, 1)} (n={p['matmul_n']}; "
            f"datasheet {H200_DATASHEET['bf16_dense_flops'] / 1e12:.0f})",
            "",
        ]
    for name, sh in rep["shapes"].items():
        lines += [f"## {name}", ""]
        for sec, err in sh.get("errors", {}).items():
            lines += [f"- {sec} failed: {err}"]
        if "experts" in sh:
            x = sh["experts"]
            lines += [
                f"E={x['E']} experts at remain rate {x['remain_rate']}: shared width "
                f"{x['shared_width_mean']:.0f}, expert width {x['expert_width_mean']:.0f}, "
                f"{x['bytes_per_expert'] / 1e6:.1f} MB per expert; dense "
                f"{x['dense_bytes'] / 1e9:.2f} GB, MoE {x['moe_bytes'] / 1e9:.2f} GB",
                "",
            ]
        if "decode" in sh:
            lines += [DECODE_HEAD, "|---" * 6]
            for r in sh["decode"]["rows"]:
                lines.append(
                    f"| {r['model']} | {r['batch']} | {r['tok_s']:.1f} | "
                    f"{1e3 * r['s_per_step']:.2f} | {r['hbm_bound_tok_s']:.1f} | "
                    f"{r['fraction_of_bound']:.0%} |"
                )
            lines.append("")
        if "load" in sh:
            ld = sh["load"]
            for k, x in ((k, ld[k]) for k in ("whole_expert", "per_layer_store") if k in ld):
                lines.append(
                    f"- expert load ({k}, from {ld['host_memory_kind']}): "
                    f"{_f(x['bytes_per_expert'], ' MB', 1e6, 1)} in "
                    f"{_f(x['median_s'], ' ms', 1e-3)} = {_f(x['bytes_per_s'], ' GB/s', 1e9)}"
                )
            lines.append("")
        if "cache" in sh:
            lines += _cache_md(sh["cache"])
        if "train" in sh:
            t = sh["train"]
            lines += [
                f"- training step (B={t['batch']}, S={t['seq']}): {t['step_s']:.3f} s, "
                f"{t['model_flops_s'] / 1e12:.2f} TFLOP/s model FLOPs = MFU "
                f"{t['mfu_vs_measured_matmul']:.1%} of the measured matmul rate, "
                f"{t['mfu_vs_datasheet']:.1%} of the datasheet",
                "",
            ]
        for k in sh.get("skipped", []):
            lines.append(f"- skipped: {k}")
    return "\n".join(lines) + "\n"


def write(rep: dict, out: Path, t0: float) -> None:
    rep["elapsed_s"] = time.monotonic() - t0
    out.mkdir(parents=True, exist_ok=True)
    (out / "device_check.json").write_text(json.dumps(rep, indent=1, default=float))
    (out / "device_check.md").write_text(markdown(rep))


NOT_ON_DEVICE = ("grain", "ml_collections", "gguf")  # absent from the accelerator image


def environment() -> dict:
    d = jax.devices()[0]
    absent = sorted({m.split(".")[0] for m in sys.modules} & set(NOT_ON_DEVICE))
    return {
        "jax": jax.__version__,
        "platform": d.platform,
        "device": d.device_kind,
        "device_count": jax.device_count(),
        "python": platform.python_version(),
        "memory_kinds": sorted(memory_kinds(d)),
        "imports_absent_on_device": absent,
    }


SECTIONS = ("decode", "load", "cache", "train")


def plan(shapes: list[str], sections: list[str]) -> list[tuple[str, str]]:
    """(shape, section) in order of importance: every shape's decode first, then the largest
    shape's remaining sections, then the others' (a cut-short run keeps the headline rows)."""
    rank = {"load": 0, "train": 1, "cache": 2}  # the engine grid last: it takes what is left
    order = [(n, "decode") for n in shapes if "decode" in sections]
    for n in reversed(shapes):  # the largest shape (listed last) first
        order += sorted(((n, s) for s in sections if s != "decode"), key=lambda x: rank[x[1]])
    return order


class Models:
    """Models built on first use and freed after their last planned section."""

    def __init__(self, rep: dict, seed: int):
        self.rep, self.seed, self.built = rep, seed, {}

    def get(self, name: str) -> Model:
        if name not in self.built:
            t = time.perf_counter()
            m = build_model(name, seed=self.seed)
            m.sp = split_params(m.rc, m.moe)  # experts on host, backbone on device
            sh = self.rep["shapes"].setdefault(name, {"skipped": []})
            sh["built_s"] = time.perf_counter() - t
            sh["experts"] = {
                "E": NUM_EXPERTS,
                "remain_rate": REMAIN_RATE,
                "shared_width_mean": float(m.spec.shared_widths.mean()),
                "expert_width_mean": float(m.spec.expert_widths.mean()),
                "dense_bytes": nbytes(m.dense),
                "moe_bytes": nbytes(m.moe),
                "bytes_per_expert": cm.model_cost(m.sp).bytes_per_expert,
            }
            self.built[name] = m
        return self.built[name]

    def free_unless(self, needed: set[str]) -> None:
        for n in [n for n in self.built if n not in needed]:
            del self.built[n]
        gc.collect()


def run_section(m: Model, sec: str, probe_: dict, args, deadline: float) -> dict:
    if sec == "decode":
        return decode_section(m, probe_["hbm_copy_bw"], args.smoke)
    if sec == "load":
        out = load_section(m)
        probe_.setdefault("link_bw", out["whole_expert"]["bytes_per_s"])
        return out
    if sec == "cache":  # at most 60% of the time left, so that the next shape gets some
        sub = time.monotonic() + 0.6 * max(0.0, deadline - time.monotonic())
        return cache_section(m, probe_, args.capacities, args.smoke, sub)
    return train_section(m, probe_["bf16_matmul_flops"], args.smoke)


def run_plan(rep: dict, args, shapes: list[str], deadline: float, save) -> None:
    todo = plan(shapes, args.sections)
    models = Models(rep, args.seed)
    for i, (name, sec) in enumerate(todo):
        sh = rep["shapes"].setdefault(name, {"skipped": []})
        if time.monotonic() > deadline:
            sh["skipped"].append(f"{sec} (time budget)")
            continue
        t = time.perf_counter()
        try:
            sh[sec] = run_section(models.get(name), sec, rep["probe"], args, deadline)
        except Exception as e:  # report it and go on (e.g. out of memory at one shape)
            sh.setdefault("errors", {})[sec] = f"{type(e).__name__}: {str(e)[:500]}"
            if args.smoke:
                raise
        sh.setdefault("section_s", {})[sec] = time.perf_counter() - t
        models.free_unless({n for n, _ in todo[i + 1 :]})
        save()


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--smoke", action="store_true", help="tiny shapes, CPU, end to end")
    ap.add_argument("--out", default=os.environ.get("OUT", "device_check_out"))
    ap.add_argument("--budget_s", type=float, default=420.0, help="stop new work after this")
    ap.add_argument("--shapes", default="", help="comma list of " + ", ".join(SHAPES))
    ap.add_argument("--sections", default=",".join(SECTIONS))
    ap.add_argument("--capacities", default="2,3,4,5,6")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    args.sections = [s for s in args.sections.split(",") if s]
    bad = [s for s in args.sections if s not in SECTIONS]
    shapes = [
        s
        for s in (args.shapes or ("smoke" if args.smoke else "tinyllama-1.1b,llama2-7b")).split(",")
        if s
    ]
    bad += [s for s in shapes if s not in SHAPES]
    if bad:
        print(f"error: unknown section(s)/shape(s) {bad}", file=sys.stderr)
        return 2
    args.capacities = [int(c) for c in args.capacities.split(",")]
    if args.smoke:
        args.capacities = args.capacities[:1]
    t0 = time.monotonic()
    deadline = t0 + args.budget_s
    cmd = " ".join(["tools/device_check.py", *(sys.argv[1:] if argv is None else argv)])
    rep = {"smoke": args.smoke, "command": cmd, "env": environment(), "shapes": {}}
    out = Path(args.out)
    save = lambda: write(rep, out, t0)  # noqa: E731
    rep["probe"] = probe(args.smoke)
    save()
    run_plan(rep, args, shapes, deadline, save)
    print(markdown(rep))
    print(f"wrote {out / 'device_check.json'} and {out / 'device_check.md'}")
    return 1 if any(sh.get("errors") for sh in rep["shapes"].values()) else 0


if __name__ == "__main__":
    sys.exit(main())
