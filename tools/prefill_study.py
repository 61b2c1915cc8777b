"""Why is our 512-token prefill slower than PyTorch's on the same cores? Variants side by side.

    python tools/prefill_study.py --rounds 3
    python tools/prefill_study.py --variants default,onednn,torch --json runs/prefill.json
    python tools/prefill_study.py --profile    # where our prefill's time goes, by HLO op

Each variant runs in its own process (XLA flags are read once per process), the variants in
alternating rounds, best round of each. A process measures, on dense SmolLM2-135M f32 (the
bundled GGUF; the peer reads a Hugging Face copy of the same weights):
  prefill   tokens/s of a 512-token prompt at batch 1, logits at the last position only
            (ours: the Generator's jitted step, as `eval.speed.prefill_tok_s`; the peer:
            `logits_to_keep=1`);
  gemm      GFLOP/s of the four matmul shapes of a layer at 512 rows ([512, 576] x [576, 960]
            q/k/v, x [576, 576] o, x [576, 3072] gate/up, [512, 1536] x [1536, 576] down), each
            repeated REPS = 10 times in one call.
Each rate is from the fastest of 4 calls, by wall clock and by the process's CPU time (`*_cpu`:
on a shared machine the CPU time leaves out the waits for a core).
Ours also in chunks (`chunk<Q>`: the prompt as 512/Q calls of Q tokens into the KV cache), with
bf16 weights (`bf16`), and with the attention changed, for this measurement only:
`no_attention` (no scores, softmax or weighted sum: what the attention costs) and
`full_scores` (the full [S, M] scores, as before the model's causal-block prefill attention,
`llama.attend`; `default` is that causal-block path, blocks of `llama.CAUSAL_BLOCK`); the
`*cache1024` variants prefill into a cache of 1024 positions (a prompt of 512 with room for
512 new tokens, as the Generator sizes its cache), not 512.
The peer runs under the peer venv (make peer), 2 threads (1 with --one_core: every process
pinned to core 0, so neither pays for thread hand-offs on a shared machine).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
S = 512
REPS = 10  # copies of each GEMM per call
GEMMS = [(576, 960), (576, 576), (576, 3072), (1536, 576)]  # [in, out] of one layer's matmuls
VARIANTS = {  # name -> (XLA_FLAGS, our options)
    "default": ("", {}),
    "onednn": ("--xla_cpu_use_onednn=true", {}),
    "onednn_dot": ("--xla_cpu_experimental_onednn_fusion_type=dot", {}),
    "xnn_dot": ("--xla_cpu_experimental_xnn_fusion_type=dot", {}),
    "no_ynn": ("--xla_cpu_experimental_ynn_fusion_type=", {}),
    "fast_math": ("--xla_cpu_enable_fast_math=true", {}),
    "no_attention": ("", {"attention": "none"}),
    "full_scores": ("", {"attention": "full_scores"}),
    "cache1024": ("", {"cache_len": 1024}),
    "full_scores_cache1024": ("", {"attention": "full_scores", "cache_len": 1024}),
    "one_eigen_thread": ("--xla_cpu_multi_thread_eigen=false", {}),
    "chunk128": ("", {"chunk": 128}),
    "chunk256": ("", {"chunk": 256}),
    "bf16": ("", {"quant": "bf16"}),
    "torch": (None, {}),
}


def _best_s(fn, reps: int = 4) -> tuple[float, float]:
    """(wall, CPU) seconds of fn's fastest call, each the minimum over `reps` after a warm-up.
    CPU time (all of the process's threads) is what the work cost: on a shared machine it
    leaves out the time the process waited for a core (with one thread, nothing spins)."""
    fn()  # compile / warm up
    wall, cpu = [], []
    for _ in range(reps):
        t, c = time.perf_counter(), time.process_time()
        fn()
        wall.append(time.perf_counter() - t)
        cpu.append(time.process_time() - c)
    return min(wall), min(cpu)


def _rates(out: dict, key: str, work: float, fn) -> None:
    wall, cpu = _best_s(fn)
    out[key], out[key + "_cpu"] = work / wall, work / cpu


def _patch_attention(kind: str) -> None:
    from readme_jax.model import llama

    if kind == "none":
        llama.attend = lambda q, k, v, ctx: q
    elif kind == "full_scores":
        llama.causal_block_ends = lambda S, M, block=None: None


def child_ours(opts: dict) -> dict:
    import jax
    import jax.numpy as jnp
    import numpy as np

    from readme_jax.checkpoints.gguf import load_gguf
    from readme_jax.decode.steps import dense_model

    if "attention" in opts:
        _patch_attention(opts["attention"])

    cfg, params = load_gguf()
    cfg = cfg.replace(scan_layers=False)
    model = dense_model(cfg, opts.get("quant", "none"))
    prepared = jax.device_put(model.prepare(params))
    out = {}
    Q = opts.get("chunk")
    Q = Q or S  # one call: as eval.speed.prefill_tok_s (logits of the last position only)
    step = jax.jit(lambda p, t, c: model.step(p, t, c, None, jnp.array([Q - 1])))
    toks = jnp.asarray(np.random.default_rng(0).integers(100, 20000, (1, S)), jnp.int32)

    M = opts.get("cache_len", S)

    def run():
        c = model.new_cache(1, M)
        for i in range(0, S, Q):
            logits, c = step(prepared, toks[:, i : i + Q], c)
        jax.block_until_ready((logits, c))

    _rates(out, "prefill_tok_s", S, run)
    dt = jnp.bfloat16 if opts.get("quant") == "bf16" else jnp.float32
    rng = np.random.default_rng(0)
    for i, o in GEMMS:
        x = jnp.asarray(rng.standard_normal((S, i)), dt)
        ws = [jnp.asarray(rng.standard_normal((i, o)) * 0.02, dt) for _ in range(REPS)]
        f = jax.jit(lambda x, ws: [jnp.dot(x, w, preferred_element_type=jnp.float32) for w in ws])
        gflop = REPS * 2 * S * i * o / 1e9
        _rates(
            out,
            f"gemm_{i}x{o}_gflops",
            gflop,
            lambda f=f, x=x, ws=ws: jax.block_until_ready(f(x, ws)),
        )
    return out


def child_torch(model_dir: str) -> dict:
    import torch
    from transformers import LlamaForCausalLM

    torch.set_num_threads(len(os.sched_getaffinity(0)))  # 2 here, 1 under --one_core
    model = LlamaForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    ids = torch.randint(100, 20000, (1, S))
    out = {"torch": torch.__version__, "mkl": torch.backends.mkl.is_available()}
    with torch.no_grad():
        _rates(out, "prefill_tok_s", S, lambda: model(input_ids=ids, logits_to_keep=1))
        for i, o in GEMMS:
            x = torch.randn(S, i)
            ws = [torch.randn(i, o) * 0.02 for _ in range(REPS)]
            gflop = REPS * 2 * S * i * o / 1e9
            _rates(out, f"gemm_{i}x{o}_gflops", gflop, lambda x=x, ws=ws: [x @ w for w in ws])
    return out


def profile(calls: int = 3) -> None:
    """Thread time per HLO op of our default prefill (JAX profiler), grouped by op kind and
    output shape: which matmuls, which attention ops. Run in its own process: it sets XLA_FLAGS."""
    os.environ["XLA_FLAGS"] = "--xla_cpu_enable_xprof_traceme=true"
    import collections
    import re

    import jax
    import jax.numpy as jnp
    import numpy as np
    from jax.profiler import ProfileData

    from readme_jax.checkpoints.gguf import load_gguf
    from readme_jax.decode.steps import dense_model

    cfg, params = load_gguf()
    model = dense_model(cfg.replace(scan_layers=False))
    p = jax.device_put(model.prepare(params))
    step = jax.jit(lambda p, t, c: model.step(p, t, c, None, jnp.array([S - 1]))[0])
    toks = jnp.asarray(np.random.default_rng(0).integers(100, 20000, (1, S)), jnp.int32)
    step(p, toks, model.new_cache(1, S)).block_until_ready()
    hlo = step.lower(p, toks, model.new_cache(1, S)).compile().as_text()
    defs = {}
    for line in hlo.splitlines():
        m = re.match(r"^\s*(?:ROOT )?%([\w.\-]+) = (\S+?)\[([\d,]*)\]\S* (\w+)\(", line)
        if m:
            called = re.search(r"calls=%([\w.\-]+)", line)
            body = ""
            if called:
                at = hlo.find(called.group(1) + " ")
                body = hlo[at : hlo.find("\n}\n", at)]
            kind = ("ynn" if "ynn_fusion" in m.group(1) else m.group(4)) + (
                "+dot" if " dot(" in body else ""
            )
            defs[m.group(1)] = f"{kind} {m.group(2)}[{m.group(3)}]"
    with tempfile.TemporaryDirectory() as d:
        with jax.profiler.trace(d):
            for _ in range(calls):
                step(p, toks, model.new_cache(1, S)).block_until_ready()
        trace = sorted(Path(d).rglob("*.xplane.pb"))[-1]
        data = ProfileData.from_file(str(trace))
    per = collections.Counter()
    for plane in data.planes:
        for line in plane.lines:
            if line.name.startswith("tf_XLA"):
                for ev in line.events:
                    if ev.name in defs:
                        per[defs[ev.name]] += ev.duration_ns
    total = sum(per.values())
    print(f"thread time of XLA ops per prefill: {total / calls / 1e6:.0f} ms")
    for k, v in per.most_common(15):
        print(f"{100 * v / total:5.1f}%  {k}")


def run_variant(name: str, model_dir: str, peer_python: str, one_core: bool) -> dict | None:
    flags, opts = VARIANTS[name]
    here = str(Path(__file__).resolve())
    pin = ["taskset", "-c", "0"] if one_core else []
    if flags is None:
        cmd = [peer_python, here, "--child", "torch", "--model_dir", model_dir]
        env = dict(os.environ)
    else:
        cmd = [sys.executable, here, "--child", "ours", "--opts", json.dumps(opts)]
        env = dict(os.environ, XLA_FLAGS=flags)
    r = subprocess.run(pin + cmd, capture_output=True, text=True, env=env, cwd=ROOT)
    if r.returncode != 0:
        print(f"[{name}] failed:\n{r.stderr[-1500:]}", file=sys.stderr)
        return None
    return json.loads(r.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--variants", default=",".join(VARIANTS))
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--peer_python", default=str(ROOT / ".venv-peer/bin/python"))
    ap.add_argument("--json", default="")
    ap.add_argument(
        "--one_core",
        action="store_true",
        help="pin every child to core 0 (taskset; the peer then runs 1 thread, XLA's pool 1)",
    )
    ap.add_argument("--child", choices=["ours", "torch"])
    ap.add_argument("--profile", action="store_true", help="profile our default prefill only")
    ap.add_argument("--opts", default="{}")
    ap.add_argument("--model_dir", default="")
    a = ap.parse_args()
    if a.child == "ours":
        print(json.dumps(child_ours(json.loads(a.opts))))
        return
    if a.child == "torch":
        print(json.dumps(child_torch(a.model_dir)))
        return
    if a.profile:
        profile()
        return
    from readme_jax.checkpoints.gguf import load_gguf
    from readme_jax.checkpoints.hf import save_hf

    names = a.variants.split(",")
    best: dict[str, dict] = {}
    rounds: list[dict] = []
    with tempfile.TemporaryDirectory() as d:
        if "torch" in names:
            save_hf(Path(d) / "model", *load_gguf())
        for r in range(a.rounds):
            for n in names:
                res = run_variant(n, str(Path(d) / "model"), a.peer_python, a.one_core)
                if res is None:
                    continue
                rounds.append({"round": r, "variant": n, **res})
                print(json.dumps(rounds[-1]), flush=True)
                for k, v in res.items():
                    if isinstance(v, float):
                        best.setdefault(n, {})[k] = max(best.get(n, {}).get(k, 0.0), v)
    keys = ["prefill_tok_s"] + [f"gemm_{i}x{o}_gflops" for i, o in GEMMS]
    for suffix, what in (("", "wall clock"), ("_cpu", "process CPU time")):
        ref = best.get("torch", {}).get("prefill_tok_s" + suffix)
        print(f"\nBest of {a.rounds} rounds, rates from {what}:")
        print("\n| variant | prefill 512 tok/s | vs torch | GFLOP/s " + " | ".join(keys[1:]) + " |")
        print("|---|---|---|" + "---|" * (len(keys) - 1))
        for n, b in best.items():
            p = b["prefill_tok_s" + suffix]
            vs = f"{p / ref:.2f}x" if ref else "-"
            cells = " | ".join(f"{b.get(k + suffix, 0.0):.1f}" for k in keys[1:])
            print(f"| {n} | {p:.0f} | {vs} | {cells} |")
    if a.json:
        Path(a.json).write_text(json.dumps({"best": best, "rounds": rounds}, indent=1))


if __name__ == "__main__":
    main()
