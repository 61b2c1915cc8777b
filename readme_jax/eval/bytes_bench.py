"""Bytes per token: the low-bit weight forms (model/quant.py) against f32, side by side.

For the dense model (and a Read-ME checkpoint when given) and every form in `modes`:
  speed    Generator decode tokens/s at each batch size, the forms in alternating rounds (best
           round of each), so a slow spell on a shared machine does not favour one form;
  bytes    the weights a batch-1 step reads (every matmul weight once; the tied head reads the
           whole embedding), the batch-1 bound = measured read bandwidth / those bytes, and what
           XLA's compiled step says it accesses (`step_bytes`: a dequantize that is not fused
           into its dot shows as extra bytes and a weight-sized temporary);
  quality  held-out perplexity, KL(f32 || form) per token and top-1 agreement with the f32
           model on the same windows (eval/perplexity.py), through the same decode step.

  res = run(BytesBenchConfig(modes=("none", "int8"), quality_tokens=1024))
  print(render(res))

`launch/bench_bytes.py` is the command line (`make bench-bytes`).
"""

from __future__ import annotations

import dataclasses
import math
import os
import platform
import re
import time
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from readme_jax.decode.generator import Generator
from readme_jax.decode.steps import DecodeModel, dense_model, readme_model
from readme_jax.eval.perplexity import perplexity_and_fidelity
from readme_jax.model import quant

START, END = "<!-- bytes:start -->", "<!-- bytes:end -->"
PROMPT_LEN = 32  # tokens 1000.. (mod V), as the speed bench


@dataclasses.dataclass(frozen=True)
class BytesBenchConfig:
    """What to measure. modes: model/quant.py QUANT_MODES, "none" (f32) first: the reference.
    readme_checkpoint: a Read-ME model directory ("" skips the Read-ME rows). quality_tokens:
    held-out tokens of `domain`'s validation split per model (0 skips quality)."""

    modes: tuple[str, ...] = ("none", "int8", "bf16", "int8_act", "int8_qwix")
    batches: tuple[int, ...] = (1, 8)
    steps: int = 30
    rounds: int = 2
    readme_checkpoint: str = ""
    domain: str = "fiction"
    quality_tokens: int = 2048
    window: int = 512


def read_bandwidth_gbs(nbytes: int = 1 << 30, reps: int = 5) -> float:
    """Best streaming read bandwidth in GB/s of a jitted sum over `nbytes` of f32."""
    x = jnp.ones(nbytes // 4, jnp.float32)
    f = jax.jit(jnp.sum)
    f(x).block_until_ready()
    best = 0.0
    for _ in range(reps):
        t = time.perf_counter()
        f(x).block_until_ready()
        best = max(best, nbytes / (time.perf_counter() - t) / 1e9)
    return best


def decode_step_time(gen: Generator, prompts: Sequence[Sequence[int]], steps: int) -> float:
    """Median seconds per decode step of `gen` (steady state, after a compiling run)."""
    for _ in gen.stream(prompts, 4, eos_ids=[]):
        pass
    ts = [time.perf_counter()]
    for _ in gen.stream(prompts, steps, eos_ids=[]):
        ts.append(time.perf_counter())
    return float(np.median(np.diff(ts)[4:]))


def decode_rates(
    gens: dict[str, Generator], batches: Sequence[int], steps: int, rounds: int
) -> dict[str, dict[int, float]]:
    """{mode: {batch: tokens/s}}, best of `rounds` alternating rounds over the modes."""
    best: dict[str, dict[int, float]] = {m: {} for m in gens}
    V = next(iter(gens.values())).model.cfg.vocab_size
    prompt = [(1000 + i) % V for i in range(PROMPT_LEN)]
    for _ in range(rounds):
        for b in batches:
            for m, g in gens.items():
                r = b / decode_step_time(g, [prompt] * b, steps)
                best[m][b] = max(best[m].get(b, 0.0), r)
    return best


def step_bytes(model: DecodeModel, params: Any, batch: int = 1, max_len: int = 128) -> dict:
    """What XLA's compiled decode step (batch `batch`, cache `max_len`) reports: "accessed_mb"
    (its cost analysis: bytes read and written per step), "temp_mb" (temporaries) and
    "dequantized_weights" (fusions that write a float copy of an int8 weight, i.e. a
    dequantize not fused into its dot)."""
    fn = jax.jit(lambda p, t, c: model.step(p, t, c, None)[0])
    tok = jnp.zeros((batch, 1), jnp.int32)
    compiled = fn.lower(params, tok, model.new_cache(batch, max_len)).compile()
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, list) else cost
    return {
        "accessed_mb": float(cost.get("bytes accessed", 0.0)) / 1e6,
        "temp_mb": compiled.memory_analysis().temp_size_in_bytes / 1e6,
        "dequantized_weights": count_weight_copies(compiled.as_text()),
    }


_DEF = re.compile(r"^\s*(?:ROOT )?%([\w.\-]+) = (\w+)\[([\d,]*)\]")


def count_weight_copies(hlo_text: str) -> int:
    """Fusions in optimized HLO text that write a float array as large as an int8 parameter
    they read: a weight dequantized in memory rather than inside its dot."""
    numel = lambda dims: math.prod(int(d) for d in dims.split(",") if d) if dims else 1
    s8 = {}
    for line in hlo_text.splitlines():
        m = _DEF.match(line)
        if m and m.group(2) == "s8" and "parameter(" in line:
            s8[m.group(1)] = numel(m.group(3))
    n = 0
    for line in hlo_text.splitlines():
        m = _DEF.match(line)
        if not m or m.group(2) not in ("f32", "bf16") or " fusion(" not in line:
            continue
        size = numel(m.group(3))
        args = line.split(" fusion(", 1)[1].split(")", 1)[0]
        if any(s8.get(a.strip().lstrip("%")) == size > 1 for a in args.split(",")):
            n += 1
    return n


def token_bytes(params: Any) -> int:
    """Weight bytes a batch-1 decode step reads: every weight once, except that of a Read-ME
    layer's FFN lists (decode layout) one entry: the fused shared + expert FFN of a top-1 model
    (`fused_*`; the separate shared and private parts are then not read), else the shared part
    and one private expert (the mean over experts). An embedding with a separate head (the
    untied LM head, the router's expert head) is read one row per token: not counted."""
    mean = lambda xs: sum(quant.weight_bytes(x) for x in xs) / len(xs)
    total = 0
    for key, sub in params.items():
        if key == "embed" and ("lm_head" in params or "head" in params):
            continue
        if key != "layers" or not isinstance(sub, list):
            total += token_bytes(sub) if isinstance(sub, dict) else quant.weight_bytes(sub)
            continue
        for lp in sub:
            fused = "fused_gate_up" in lp
            for k, v in lp.items():
                if isinstance(v, list):
                    total += mean(v) if fused == k.startswith("fused_") else 0
                elif not (fused and k.startswith("shared_")):
                    total += quant.weight_bytes(v)
    return int(total)


def logits_fn(model: DecodeModel):
    """(params, tokens_BxS) -> logits [B, S, V] through the model's decode step (a fresh cache),
    so the quality is that of the weights as they are served."""

    def fn(params, tokens_BxS):
        B, S = tokens_BxS.shape
        return model.step(params, tokens_BxS, model.new_cache(B, S), None)[0]

    return fn


def quality(
    models: dict[str, DecodeModel], prepared: dict[str, Any], tokens_T: np.ndarray, window: int
) -> dict[str, dict]:
    """{mode: {"ppl", "kl", "top1"}} against models["none"] on the same windows."""
    ref_fn, ref = logits_fn(models["none"]), prepared["none"]
    out = {}
    for m, model in models.items():
        ppl, fid = perplexity_and_fidelity(
            ref_fn,
            ref,
            logits_fn(model),
            prepared[m],
            tokens_T,
            max_length=window,
            batch_size=4,
            progress=False,
        )
        out[m] = {
            "ppl": math.exp(ppl.nll_sum / ppl.n_tokens),
            "kl": fid.kl_sum / fid.n_tokens,
            "top1": fid.n_agree / fid.n_tokens,
            "tokens": ppl.n_tokens,
        }
    return out


def store_form(params: Any) -> Any:
    """f32 params whose matmul weights are their int8 values times their scales, quantized in
    the stacked layout: each expert and the shared part apart, per layer and output channel,
    as the offload store holds them (the decode layout's fused shared + expert down
    projection shares one scale per channel instead)."""
    q = quant.quantize_params(params["backbone"], "int8")  # the router stays f32, as served
    bb = jax.tree.map(quant.dequantize, q, is_leaf=lambda x: isinstance(x, quant.QWeight))
    return {**params, "backbone": bb}


def bench_model(
    name: str, make, params, c: BytesBenchConfig, tokens_T, offload_form: bool = False
) -> dict:
    """Every measurement of one model; make(mode) -> DecodeModel. offload_form (Read-ME):
    also the quality of the int8 weights as the offload store holds them (`store_form`)."""
    models = {m: make(m) for m in c.modes}
    gens = {m: Generator(models[m], params) for m in c.modes}
    res: dict[str, Any] = {"model": name, "modes": list(c.modes)}
    res["weight_mb"] = {m: quant.weight_bytes(g.params) / 1e6 for m, g in gens.items()}
    res["token_mb"] = {m: token_bytes(g.params) / 1e6 for m, g in gens.items()}
    res["xla"] = {m: step_bytes(models[m], g.params) for m, g in gens.items()}
    rates = decode_rates(gens, c.batches, c.steps, c.rounds)
    res["tok_s"] = {m: {str(b): r for b, r in v.items()} for m, v in rates.items()}
    if tokens_T is not None:
        res["quality"] = quality(models, {m: g.params for m, g in gens.items()}, tokens_T, c.window)
        if offload_form and "int8" in c.modes:
            ref = models["none"]
            both = {"none": gens["none"].params, "int8_store": ref.prepare(store_form(params))}
            q = quality({"none": ref, "int8_store": ref}, both, tokens_T, c.window)
            res["quality"]["int8_store"] = q["int8_store"]
    return res


def run(c: BytesBenchConfig, dense_source: Any = None, readme_source: Any = None) -> dict:
    """All rows. dense_source: (cfg, params) (default: the bundled SmolLM2 GGUF, f32);
    readme_source: (rc, params) (default: c.readme_checkpoint, if any)."""
    from readme_jax.checkpoints import models as ckpts

    for m in c.modes:
        quant.check_mode(m)
    if c.modes[0] != "none":
        raise ValueError(f"modes must start with 'none' (the f32 reference), got {c.modes}")
    if dense_source is None:
        cfg, params, tok = ckpts.load_dense("")
    else:
        (cfg, params), tok = dense_source, None
    tokens_T = None
    if c.quality_tokens:
        from readme_jax.checkpoints.tokenizer import load_tokenizer
        from readme_jax.data.pipeline import load_tokens

        stream = load_tokens(c.domain, "validation", tok or load_tokenizer())
        tokens_T = np.asarray(stream[: c.quality_tokens])
    out = {
        "machine": f"{platform.machine()}, {os.cpu_count()} cores, JAX {jax.__version__}",
        "date": time.strftime("%Y-%m-%d"),
        "bandwidth_gbs": read_bandwidth_gbs(),
    }
    cfg = cfg.replace(scan_layers=False)
    out["dense"] = bench_model("dense", lambda m: dense_model(cfg, m), params, c, tokens_T)
    if readme_source is None and c.readme_checkpoint:
        m = ckpts.load_readme(c.readme_checkpoint)
        readme_source = (m.rc, m.params)
    if readme_source is not None:
        rc, rparams = readme_source
        out["readme"] = bench_model(
            "Read-ME", lambda m: readme_model(rc, m), rparams, c, tokens_T, offload_form=True
        )
    return out


MODE_NAMES = {
    "none": "f32",
    "int8": "int8 (two-digit int8 dot)",
    "bf16": "bf16",
    "int8_act": "int8 w8a8 (Qwix, 8-bit inputs)",
    "int8_qwix": "int8 (Qwix dequantize + f32 dot)",
    "int8_store": "int8 as the offload store holds it (shared and experts apart; f32 dot)",
}


def render(res: dict, cmd: str, extra: Sequence[str] = ()) -> str:
    """The markdown section (between START and END) of one `run`'s results; `extra` lines go
    at its end (the offload engine's rows, serve/bench/offload.py)."""
    bw = res["bandwidth_gbs"]
    lines = [
        START,
        f"Command: `{cmd}` on {res['machine']}, {res['date']}; read bandwidth {bw:.1f} GB/s "
        "(jitted sum over 1 GB). The forms ran in alternating rounds in one process (best "
        "round each); ratios are to f32 measured in the same run.",
    ]
    for key in ("dense", "readme"):
        r = res.get(key)
        if r is None:
            continue
        bs = list(r["tok_s"]["none"])
        lines += ["", f"#### {r['model']}", ""]
        head = "| weights | MB read per token (batch 1) | XLA: MB accessed / step | "
        head += "".join(f"decode b{b} tok/s (x f32) | " for b in bs) + "bound b1 | b1 of bound |"
        lines += [head, "|" + "---|" * (5 + len(bs))]
        for m in r["modes"]:
            mb, x = r["token_mb"][m], r["xla"][m]
            cells = "".join(
                f"{r['tok_s'][m][b]:.1f} ({r['tok_s'][m][b] / r['tok_s']['none'][b]:.2f}x) | "
                for b in bs
            )
            bound = bw * 1e3 / mb
            frac = r["tok_s"][m][bs[0]] / bound
            dq = (
                f" ({x['dequantized_weights']} f32 weight copies)"
                if x["dequantized_weights"]
                else ""
            )
            lines.append(
                f"| {MODE_NAMES.get(m, m)} | {mb:.0f} | {x['accessed_mb']:.0f}{dq} | {cells}"
                f"{bound:.1f} | {frac:.0%} |"
            )
        if "quality" in r:
            q = r["quality"]
            n = q["none"]["tokens"]
            lines += [
                "",
                f"Quality ({n} held-out tokens, windows of 512): perplexity, KL(f32 || form) "
                "per token, top-1 agreement with f32.",
                "",
                "| weights | perplexity | vs f32 | KL | top-1 |",
                "|---|---|---|---|---|",
            ]
            for m in q:
                d = q[m]["ppl"] / q["none"]["ppl"] - 1
                lines.append(
                    f"| {MODE_NAMES.get(m, m)} | {q[m]['ppl']:.3f} | {d:+.2%} | "
                    f"{q[m]['kl']:.4f} | {q[m]['top1']:.1%} |"
                )
    lines += list(extra)
    lines.append(END)
    return "\n".join(lines)


def write_section(path, section: str, title: str = "## Bytes per token (make bench-bytes)") -> None:
    """Put `section` into the markdown file `path` (replacing the one between START and END,
    else appended under `title`)."""
    from pathlib import Path

    p = Path(path)
    text = p.read_text() if p.exists() else "# Benchmarks\n"
    if START in text and END in text:
        text = text[: text.index(START)] + section + text[text.index(END) + len(END) :]
    else:
        text = text.rstrip() + f"\n\n{title}\n\n" + section + "\n"
    p.write_text(text)
