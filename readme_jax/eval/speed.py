"""Speed of the decode library, measured side by side in one process (what `make bench` runs).

  dense     ours vs a peer (Hugging Face transformers / PyTorch, run by the caller's `peer`
            function) on the same SmolLM2 f32 weights: prefill tokens/s (512-token prompt),
            decode tokens/s at batch 1 and 8, batch-1 decode as a fraction of the memory
            bandwidth bound (weight bytes per token / measured read bandwidth).
  moe       Read-ME vs the dense model: prefill and decode tokens/s, FFN bytes per token.
  ablation  one jitted batch-1 decode step per variant (dense, dense cut to the MoE's active
            FFN width, Read-ME as served), on all cores or pinned to one in a fresh process.
`render` writes the markdown section that `write_section` puts between the bench markers of
docs/benchmarks.md. Rates are tokens/s of wall time; times are seconds unless named _ms.
"""

from __future__ import annotations

import dataclasses
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from readme_jax.checkpoints import models
from readme_jax.checkpoints.hf import save_hf
from readme_jax.decode.generator import Generator
from readme_jax.decode.steps import dense_model, readme_model
from readme_jax.model import llama
from readme_jax.refactor.pipeline import Recipe, build_readme
from readme_jax.refactor.reconstruct import ReconstructConfig

START, END = "<!-- bench:start -->", "<!-- bench:end -->"
PROMPT = list(range(1000, 1032))  # a 32-token prompt of real vocabulary ids
PeerFn = Callable[[Any, Any], "dict | None"]  # (cfg, params) -> the peer's rates, or None


def read_bandwidth_gbs(nbytes: int = 1 << 30) -> float:
    """Best-of-5 streaming read bandwidth (GB/s): max of numpy and a jitted XLA reduction."""
    a = np.ones(nbytes // 4, np.float32)
    best = 0.0
    for _ in range(5):
        t = time.perf_counter()
        a.sum()
        best = max(best, nbytes / (time.perf_counter() - t) / 1e9)
    x = jnp.asarray(a)
    f = jax.jit(jnp.sum)
    f(x).block_until_ready()
    for _ in range(5):
        t = time.perf_counter()
        f(x).block_until_ready()
        best = max(best, nbytes / (time.perf_counter() - t) / 1e9)
    return best


def decode_step_time(gen: Generator, prompts: list[list[int]], steps: int = 40) -> float:
    """Median seconds per decode step of `gen` on `prompts` (steady state, compile excluded)."""
    for _ in gen.stream(prompts, 4, eos_ids=[]):  # compile
        pass
    ts = [time.perf_counter()]
    for _ in gen.stream(prompts, steps, eos_ids=[]):
        ts.append(time.perf_counter())
    return float(np.median(np.diff(ts)[4:]))


def prefill_tok_s(model, params, S: int = 512, reps: int = 3) -> float:
    """Batch-1 prefill tokens/s of an S-token prompt as the Generator runs it (logits of the
    last position only). `params` in the model's decode layout (`model.prepare`)."""
    last = jnp.array([S - 1], jnp.int32)
    step = jax.jit(lambda p, t, c: model.step(p, t, c, None, last)[0])
    toks = jnp.asarray(np.random.default_rng(0).integers(100, 20000, (1, S)), jnp.int32)
    step(params, toks, model.new_cache(1, S)).block_until_ready()
    ts = []
    for _ in range(reps):
        c = model.new_cache(1, S)
        t = time.perf_counter()
        step(params, toks, c).block_until_ready()
        ts.append(time.perf_counter() - t)
    return S / float(np.median(ts))


def bytes_of(tree) -> int:
    return int(sum(a.size * a.dtype.itemsize for a in jax.tree.leaves(tree)))


def bench_dense(cfg, params, peer: PeerFn | None = None, rounds: int = 2) -> dict:
    """Ours and the peer in alternating rounds (ours, peer, ours, peer, ...); the best round
    of each is reported, so a slow spell on a shared machine favours neither."""
    model = dense_model(cfg)
    gen = Generator(model, params)
    runs, peer_runs = [], []
    for _ in range(rounds):
        r = {"prefill_512_tok_s": prefill_tok_s(model, gen.params)}
        for b in (1, 8):
            r[f"decode_b{b}_tok_s"] = b / decode_step_time(gen, [PROMPT] * b)
        runs.append(r)
        pr = peer(cfg, params) if peer else None
        if pr is not None:
            peer_runs.append(pr)
    res: dict[str, Any] = {k: max(r[k] for r in runs) for k in runs[0]}
    res["rounds"] = runs
    # batch-1 decode reads every weight once (tied head reads the whole embedding), plus the cache
    res["weight_bytes"] = bytes_of(params)
    res["bandwidth_gbs"] = read_bandwidth_gbs()
    res["bound_tok_s"] = res["bandwidth_gbs"] * 1e9 / res["weight_bytes"]
    res["fraction_of_bound"] = res["decode_b1_tok_s"] / res["bound_tok_s"]
    if peer_runs:
        best = {k: max(r[k] for r in peer_runs) for k in peer_runs[0] if k.endswith("tok_s")}
        res["peer"] = {**peer_runs[0], **best, "rounds": peer_runs}
    return res


def run_peer(cfg, params, python: str | Path, script: str | Path) -> dict | None:
    """The peer's rates on the same weights: `script MODEL_DIR OUT.json` run by `python` (a
    torch venv) on a Hugging Face copy of `params`; None (with one line) if it cannot run."""
    if not Path(python).exists():
        print(f"[bench] no peer python at {python}; skipping the PyTorch peer")
        return None
    with tempfile.TemporaryDirectory() as d:
        save_hf(Path(d) / "model", cfg, params)
        out = Path(d) / "peer.json"
        cmd = [str(python), str(script), str(Path(d) / "model"), str(out)]
        r = subprocess.run(cmd, capture_output=True, text=True)
        if r.returncode != 0:
            print(f"[bench] peer failed:\n{r.stderr[-2000:]}")
            return None
        return json.loads(out.read_text())


def quick_moe(cfg, dense, tok, remain_rate: float = 0.5):
    """(rc, params, spec) of a Read-ME MoE from a small real calibration (4 x 256 tokens of
    each of the four text domains, not cached; no refit: speed does not depend on it;
    untrained router)."""
    recipe = Recipe(
        domains="fiction,drama,code_docs,manual",
        num_sequences=4,
        seq_len=256,
        remain_rate=remain_rate,
        scan_layers=cfg.scan_layers,
        refit=ReconstructConfig(mode="none"),
    )
    m = build_readme(recipe, source=(cfg, dense, tok)).model
    return m.rc, m.params, m.spec


def bench_moe(cfg, dense, rc, params, spec, dense_res: dict) -> dict:
    """Read-ME vs dense in alternating rounds (best of 2 each), served the decode library's
    way (select dispatch for a decoded token, switched blocks for a prompt), and the bytes
    each reads per decoded token. `dense_res`: `bench_dense`'s result (weight bytes)."""
    gen, dgen = Generator(readme_model(rc), params), Generator(dense_model(cfg), dense)
    best: dict[str, float] = {}
    for _ in range(2):
        for name, g in (("dense", dgen), ("moe", gen)):
            k = f"{name}_prefill"
            best[k] = max(best.get(k, 0.0), prefill_tok_s(g.model, g.params))
        for b in (1, 8):
            for name, g in (("dense", dgen), ("moe", gen)):
                k = f"{name}_b{b}"
                best[k] = max(best.get(k, 0.0), b / decode_step_time(g, [PROMPT] * b))
    res: dict[str, Any] = {}
    for b in (1, 8):
        res[f"decode_b{b}_tok_s"] = best[f"moe_b{b}"]
        res[f"dense_decode_b{b}_tok_s"] = best[f"dense_b{b}"]
    res["prefill_512_tok_s"] = best["moe_prefill"]
    res["dense_prefill_512_tok_s"] = best["dense_prefill"]
    L, D = cfg.n_layers, cfg.dim
    lp = params["backbone"]["layers"]
    fs, fe = lp["shared_down"].shape[-2], lp["expert_down"].shape[-2]
    res["ffn_bytes_dense"] = L * 3 * D * cfg.ffn_dim * 4
    res["ffn_bytes_moe_padded"] = L * 3 * D * (fs + fe) * 4
    # the select decode layout trims the padding, so a token reads the real channels only
    res["ffn_bytes_moe_real"] = int(
        3 * D * 4 * (spec.shared_widths.sum() + spec.expert_widths.mean(-1).sum())
    )
    res["router_bytes"] = bytes_of(params["router"]) - params["router"]["embed"].size * 4
    other = dense_res["weight_bytes"] - res["ffn_bytes_dense"]
    res["bytes_per_token_dense"] = dense_res["weight_bytes"]
    res["bytes_per_token_moe"] = other + res["ffn_bytes_moe_real"] + res["router_bytes"]
    res["expected_speedup"] = res["bytes_per_token_dense"] / res["bytes_per_token_moe"]
    return res


# ---------------------------------------------------------------- one decode step per variant
ABLATION_VARIANTS = {
    "dense": "dense",
    "dense_narrow": "dense, FFN cut to the MoE's active width (no routing)",
    "moe": "Read-ME, in-graph switch (as served)",
}


def _timed_ms(step, params, cache, tok, n: int) -> float:
    """Median ms per call of step(params, cache, tok) -> (tok, cache) after 3 warm calls."""
    for _ in range(3):
        tok, cache = step(params, cache, tok)
    jax.block_until_ready(tok)
    ts = []
    for _ in range(n):
        t = time.perf_counter()
        tok, cache = step(params, cache, tok)
        jax.block_until_ready(tok)
        ts.append(time.perf_counter() - t)
    return 1e3 * float(np.median(ts))


def decode_ablation(checkpoint: str | Path, rounds: int = 6, steps: int = 10, M: int = 128):
    """{"rounds": {variant: [ms]}, "median_ms", "best_ms", "width"}: one jitted greedy batch-1
    decode step (M-slot per-layer KV cache, donated) per ABLATION_VARIANTS entry, the variants
    taking turns in each round, on the Read-ME model at `checkpoint` and the bundled dense
    model."""
    m = models.load_readme(checkpoint)
    cfg = m.rc.model
    width = int(round(float(m.spec.shared_widths.mean() + m.spec.expert_widths.mean())))
    dm, rm = dense_model(cfg), readme_model(m.rc)
    dp = llama.unstack_layers(models.load_dense(scan_layers=False)[1])
    narrow_layers = [
        {
            **lp,
            "w_gate_up": jnp.array(lp["w_gate_up"][..., :width]),
            "w_down": jnp.array(lp["w_down"][:width]),
        }
        for lp in dp["layers"]
    ]

    def step_of(model):
        def step(p, c, tok):
            lg, c = model.step(p, tok[:, None], c, None)
            return jnp.argmax(lg[:, -1], -1).astype(jnp.int32), c

        return jax.jit(step, donate_argnums=(1,))

    dstep = step_of(dm)
    variants = {
        "dense": (dstep, dp, lambda: dm.new_cache(1, M)),
        "dense_narrow": (dstep, {**dp, "layers": narrow_layers}, lambda: dm.new_cache(1, M)),
        "moe": (step_of(rm), rm.prepare(m.params), lambda: rm.new_cache(1, M)),
    }
    res: dict[str, list[float]] = {k: [] for k in variants}
    for _ in range(rounds):
        for k, (step, params, new_cache) in variants.items():
            res[k].append(_timed_ms(step, params, new_cache(), jnp.array([1000], jnp.int32), steps))
    return {
        "rounds": res,
        "median_ms": {k: float(np.median(v)) for k, v in res.items()},
        "best_ms": {k: float(np.min(v)) for k, v in res.items()},
        "width": width,
    }


def decode_ablation_process(checkpoint: str | Path, one_core: bool, rounds: int = 6) -> dict | None:
    """`decode_ablation` in a fresh process, on all cores or pinned to one before JAX starts
    (every matvec then streams with no intra-op thread hand-offs: the step is bound by memory
    bandwidth, as on an accelerator). None (with the child's error) if it fails."""
    with tempfile.TemporaryDirectory() as d:
        out = Path(d) / "ablation.json"
        pin = f"os.sched_setaffinity(0, {{{min(os.sched_getaffinity(0))}}})" if one_core else ""
        code = (
            f"import json, os; {pin}\n"
            "from readme_jax.eval.speed import decode_ablation\n"
            f"r = decode_ablation({str(checkpoint)!r}, rounds={rounds})\n"
            f"open({str(out)!r}, 'w').write(json.dumps(r))\n"
        )
        r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
        if r.returncode != 0:
            print(f"[bench] decode ablation failed:\n{r.stderr[-2000:]}")
            return None
        return json.loads(out.read_text())


def ablations(rc, params, spec, checkpoint: str | None = None) -> dict:
    """{"all_cores", "one_core"} of `decode_ablation_process` on `checkpoint`, or on the given
    model saved to a temporary directory."""
    with tempfile.TemporaryDirectory() as d:
        ck = checkpoint or str(models.save_readme(Path(d) / "moe", params, rc, spec))
        return {
            "all_cores": decode_ablation_process(ck, one_core=False),
            "one_core": decode_ablation_process(ck, one_core=True),
        }


# ---------------------------------------------------------------- the markdown section
def _table(head: str, rows: list[list[str]]) -> list[str]:
    cols = head.count("|") - 1
    return [head, "|" + "---|" * cols, *("| " + " | ".join(r) + " |" for r in rows)]


def render(dense: dict, moe: dict | None, cmd: str) -> str:
    """The bench section (START ... END) of docs/benchmarks.md from `bench_dense` and the
    `bench_moe` result (with "source", and optionally "ablation" and "engine")."""
    p = dense.get("peer") or {}
    head = [
        START,
        f"Command: `{cmd}` on {platform.machine()} with {os.cpu_count()} cores, "
        f"JAX {jax.__version__}, {time.strftime('%Y-%m-%d')}.",
        "",
        "### Dense SmolLM2-135M f32: ours vs Hugging Face transformers (PyTorch)",
        "",
    ]
    rows = []
    for k, name in [
        ("prefill_512_tok_s", "prefill tok/s (512-token prompt)"),
        ("decode_b1_tok_s", "decode tok/s, batch 1"),
        ("decode_b8_tok_s", "decode tok/s, batch 8"),
    ]:
        pv, ratio = (f"{p[k]:.1f}", f"{dense[k] / p[k]:.2f}x") if p.get(k) else ("n/a", "n/a")
        rows.append([name, f"{dense[k]:.1f}", pv, ratio])
    lines = head + _table(
        "| metric | readme_jax | transformers/PyTorch | ratio (ours/peer) |", rows
    )
    lines += [
        "",
        f"Batch-1 bandwidth bound: {dense['weight_bytes'] / 1e6:.0f} MB of weights per token / "
        f"{dense['bandwidth_gbs']:.1f} GB/s measured read bandwidth = {dense['bound_tok_s']:.1f} "
        f"tok/s; ours reaches {dense['fraction_of_bound']:.0%} of it.",
    ]
    if moe:
        lines += _moe_lines(moe) + _ablation_lines(moe) + engine_lines(moe.get("engine"))
    lines.append(END)
    return "\n".join(lines)


def _moe_lines(moe: dict) -> list[str]:
    rows = []
    for k, name in [
        ("prefill_512_tok_s", "prefill tok/s (512, switched blocks)"),
        ("decode_b1_tok_s", "decode tok/s, batch 1 (select dispatch)"),
        ("decode_b8_tok_s", "decode tok/s, batch 8 (select dispatch)"),
    ]:
        d = moe["dense_" + k]
        rows.append([name, f"{d:.1f}", f"{moe[k]:.1f}", f"{moe[k] / d:.2f}x"])
    mb = {k: moe[k] / 1e6 for k in moe if k.startswith(("bytes", "ffn_bytes"))}
    return [
        "",
        f"### Read-ME MoE vs dense (same process; MoE: {moe['source']})",
        "",
        *_table("| metric | dense | Read-ME MoE | ratio (MoE/dense) |", rows),
        "",
        f"Bytes read per decoded token (batch 1): dense {mb['bytes_per_token_dense']:.0f} MB, "
        f"MoE {mb['bytes_per_token_moe']:.0f} MB (FFN {mb['ffn_bytes_dense']:.0f} -> "
        f"{mb['ffn_bytes_moe_real']:.0f} MB: the decode layout drops the zero padding that "
        "the stacked experts and the stacked shared parts carry, "
        f"{mb['ffn_bytes_moe_padded']:.0f} MB); proportional "
        f"speedup {moe['expected_speedup']:.2f}x, measured "
        f"{moe['decode_b1_tok_s'] / moe['dense_decode_b1_tok_s']:.2f}x. Dense and MoE decode "
        "were measured in alternating rounds (best of 2 each).",
    ]


def _ablation_lines(moe: dict) -> list[str]:
    ab = moe.get("ablation") or {}
    if not (ab.get("all_cores") and ab.get("one_core")):
        return []
    a, o = ab["all_cores"]["median_ms"], ab["one_core"]["median_ms"]
    rows = [
        [
            name,
            f"{a[k]:.1f}",
            f"{a['dense'] / a[k]:.2f}x",
            f"{o[k]:.1f}",
            f"{o['dense'] / o[k]:.2f}x",
        ]
        for k, name in ABLATION_VARIANTS.items()
    ]
    return [
        "",
        "#### Batch-1 decode step: all cores vs one core",
        "",
        "`readme_jax.eval.speed.decode_ablation` on the same MoE, once on all cores and once "
        "pinned to one core (median ms per jitted step over alternating rounds). On one core "
        "every matvec streams with no intra-op thread hand-offs, so the step is bound by "
        "memory bandwidth, as a decode step is on an accelerator.",
        "",
        *_table(
            "| variant | all cores, ms | speedup vs dense | one core, ms | speedup vs dense |", rows
        ),
        "",
        f"Bytes predict {moe['expected_speedup']:.2f}x.",
    ]


def engine_lines(en: dict | None) -> list[str]:
    """The engine-vs-Generator table of `serve.bench.profile.bench_engine`'s result."""
    if not en:
        return []
    rows = [
        [
            f"batch {b}",
            f"{en[f'generator_b{b}']:.1f}",
            f"{en[f'engine_b{b}']:.1f}",
            f"{en[f'ratio_b{b}']:.2f}x",
        ]
        for b in (1, 8)
    ]
    return [
        "",
        "#### Serving engine vs Generator (same Read-ME model, every expert resident)",
        "",
        *_table("| decode tok/s | Generator | engine | ratio (engine/Generator) |", rows),
    ]


def write_section(out: str | Path, section: str) -> None:
    """Replace the START ... END section of `out` (or append it under a heading)."""
    out = Path(out)
    text = out.read_text() if out.exists() else "# Benchmarks\n\n"
    if START in text and END in text:
        a, b = text.index(START), text.index(END) + len(END)
        text = text[:a] + section + text[b:]
    else:
        text = text.rstrip() + "\n\n## Speed (make bench)\n\n" + section + "\n"
    out.write_text(text)


def as_json(res: Any) -> str:
    """The results as JSON (dataclasses and numpy scalars included)."""

    def default(x):
        if dataclasses.is_dataclass(x):
            return dataclasses.asdict(x)
        return x.item() if hasattr(x, "item") else str(x)

    return json.dumps(res, indent=2, default=default)
