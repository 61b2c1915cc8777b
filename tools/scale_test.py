"""Paper scale on one host: convert a random Llama-2-7B-shaped checkpoint end to end and print
the wall time and peak RSS of each stage.

  python tools/scale_test.py --layers 8             # make scale-test LAYERS=8
  python tools/scale_test.py --layers 32 --moe-arrays disk

Stages: write (a sharded bf16 safetensors directory as transformers writes it, one tensor in
memory at a time) -> load (embedding and head; the decoder layers stay on disk and are read one
at a time when used: checkpoints/layers.py) -> calibrate (per layer) -> refactor (experts built
and refit layer by layer into their final arrays: refactor/layerwise.py) -> save -> load the
Read-ME model -> generate. Calibration uses random token ids (memory and time depend on shapes,
not on text). Gate/up channels are scaled by a per-channel lognormal factor (--channel-spread)
so that domains agree on part of their top channels, as on real text (shared ~ a quarter of F),
instead of picking independent random halves. --moe-arrays disk keeps the Read-ME backbone's
[L, ...] arrays in memory-mapped files under --dir while they are built (each layer's pages are
written back and unmapped after it), so the refactor stage holds one layer's working set
whatever the depth.

Peak RSS is sampled every 10 ms by a thread (psutil), with its anonymous part (RSS minus
file-backed pages: what the kernel cannot drop under pressure); --max-rss-gb ends the process
(exit 3) as soon as the anonymous RSS passes it, and --min-free-gb as soon as the machine's
available memory falls below it, before the kernel's OOM killer would pick a process.
"""

from __future__ import annotations

import argparse
import functools
import gc
import json
import os
import re
import shutil
import subprocess
import sys
import threading
import time
import zlib
from pathlib import Path

os.environ.setdefault("TQDM_DISABLE", "1")  # one line per stage instead of progress bars

import jax
import jax.numpy as jnp
import numpy as np
import psutil

from readme_jax.api import LoadedModel
from readme_jax.checkpoints import hf, layers, models
from readme_jax.checkpoints.errors import CheckpointError
from readme_jax.decode.generator import Generator
from readme_jax.decode.steps import LAYOUTS, readme_model
from readme_jax.eval.bytes_bench import read_bandwidth_gbs, token_bytes
from readme_jax.model.config import LlamaConfig, MoEConfig, ReadMEConfig, RouterConfig
from readme_jax.model.readme import readme_forward
from readme_jax.refactor import layerwise, pipeline, reconstruct

GB = 1e9


class RssMeter:
    """Peak RSS of this process per stage, and of its anonymous part, sampled by a thread."""

    def __init__(self, limit_gb: float = 0.0, min_free_gb: float = 0.0, every_s: float = 0.01):
        self.proc = psutil.Process()
        self.limit, self.min_free = limit_gb * GB, min_free_gb * GB
        self.peak, self.peak_anon = self.now()
        self.rows: list[dict] = []
        self.on_abort = lambda: None  # e.g. delete the work directory
        self.json_path = ""
        threading.Thread(target=self._run, args=(every_s,), daemon=True).start()

    def now(self) -> tuple[int, int]:
        """(RSS, anonymous RSS = RSS less file-backed and shared pages)."""
        m = self.proc.memory_info()
        return m.rss, m.rss - m.shared

    def _run(self, every_s: float) -> None:
        while True:
            r, anon = self.now()
            self.peak, self.peak_anon = max(self.peak, r), max(self.peak_anon, anon)
            if self.limit and anon > self.limit:
                self._abort(
                    f"anonymous RSS {anon / GB:.2f} GB passed --max-rss-gb {self.limit / GB}"
                )
            free = psutil.virtual_memory().available
            if free < self.min_free:  # other processes share the machine: leave them room
                self._abort(f"RSS {r / GB:.2f} GB; the machine has {free / GB:.2f} GB left")
            time.sleep(every_s)

    def _abort(self, why: str) -> None:
        stage = f" in stage {self.current!r}" if getattr(self, "current", "") else ""
        print(f"\n{why}{stage}; aborting", flush=True)
        self.on_abort()
        os._exit(3)

    def stage(self, name: str, fn, *a, **kw):
        """Run fn, record (wall s, RSS before, peak, peak anonymous, after), print one line;
        returns fn's value."""
        gc.collect()
        self.current = name
        before, _ = self.now()
        self.peak, self.peak_anon = self.now()
        t0 = time.perf_counter()
        out = fn(*a, **kw)
        wall = time.perf_counter() - t0
        r, anon = self.now()
        row = {"stage": name, "wall_s": round(wall, 1), "rss_before_gb": before / GB}
        row |= {"peak_gb": max(self.peak, r) / GB, "peak_anon_gb": max(self.peak_anon, anon) / GB}
        row["rss_after_gb"] = r / GB
        self.rows.append(row)
        if self.json_path:  # an aborted run keeps the stages it finished
            Path(self.json_path).write_text(json.dumps({"stages": self.rows}, indent=2))
        print(
            f"[{name:>9}] {wall:7.1f} s  RSS {row['rss_before_gb']:5.2f} -> peak "
            f"{row['peak_gb']:5.2f} GB (anonymous {row['peak_anon_gb']:5.2f}; after "
            f"{row['rss_after_gb']:5.2f})",
            flush=True,
        )
        return out


def paper_config(a) -> LlamaConfig:
    return LlamaConfig(
        vocab_size=a.vocab,
        dim=a.dim,
        n_layers=a.layers,
        n_heads=a.heads,
        n_kv_heads=a.heads,
        ffn_dim=a.ffn,
        max_seq_len=4096,
        tie_embeddings=False,
        dtype="bfloat16",
        bos_id=1,
        eos_ids=(2,),
    )


def random_tensor(spread: float, seed: int):
    """tensor_fn for hf.write_hf: N(0, 0.02) weights (norms 1), each layer's gate/up rows scaled
    by one lognormal(0, spread) factor per FFN channel; deterministic per tensor name."""

    def fn(name: str, shape: tuple[int, ...]) -> np.ndarray:
        if "norm" in name:
            return np.ones(shape, np.float32)
        rng = np.random.default_rng([seed, zlib.crc32(name.encode())])
        w = rng.standard_normal(shape, np.float32)
        w *= 0.02
        if name.endswith(("gate_proj.weight", "up_proj.weight")):
            layer = name.split(".")[2]
            crng = np.random.default_rng([seed, zlib.crc32(layer.encode())])
            w *= np.exp(spread * crng.standard_normal((shape[0], 1), np.float32))
        return w

    return fn


def calib_batches(a, V: int) -> dict[str, list[np.ndarray]]:
    rng = np.random.default_rng(a.seed)
    out = {}
    for e in range(a.domains):
        toks = rng.integers(3, V, (a.seqs, a.seq_len))
        out[f"d{e}"] = [toks[i : i + 4] for i in range(0, a.seqs, 4)]
    return out


class ConsumingArrays(layerwise.DiskArrays):
    """DiskArrays that also deletes each checkpoint shard once every layer it holds is built
    (--consume-checkpoint: a disk without room for the dense model and its MoE at once; the
    random checkpoint is deleted at the end anyway). Layers finish in order, one release each."""

    def __init__(self, root: Path, ckpt: Path):
        super().__init__(root)
        self.ckpt, self.done, self.last = ckpt, -1, {}
        weight_map = json.loads((ckpt / hf.INDEX_NAME).read_text())["weight_map"]
        for name, f in weight_map.items():
            m = re.match(r"model\.layers\.(\d+)\.", name)
            old = self.last.get(f, -1)
            self.last[f] = None if m is None or old is None else max(old, int(m.group(1)))

    def release(self) -> None:
        super().release()
        self.done += 1
        for f, last in list(self.last.items()):
            if last is not None and last <= self.done:
                (self.ckpt / f).unlink()
                del self.last[f]


def convert(a, meter: RssMeter, ckpt: Path, moe_dir: Path) -> dict:
    """load -> calibrate -> refactor -> save: the pipeline's calibrate and refactor stages with
    the paper's construction and the default refit, one layer at a time."""
    load = layers.open_hf if a.dense == "disk" else hf.load_hf
    cfg, dense = meter.stage("load", load, ckpt, "bfloat16")
    batches = calib_batches(a, cfg.vocab_size)
    record = {"checkpoint": str(ckpt), "domains": list(batches), "tokens": "random ids"}
    calib = moe_dir.parent / "calib" if a.resume else None  # statistics kept for a rerun
    stats = meter.stage("calibrate", pipeline.calibrate, cfg, dense, batches, record, calib)
    mcfg, router = MoEConfig(a.domains), RouterConfig()
    rcfg = reconstruct.ReconstructConfig("lstsq", a.ridge, a.refit_seqs)
    resume = moe_dir.parent / "refactor" if a.resume else None
    arrays = moe_dir.parent / "moe_arrays" if resume is None else resume / "arrays"
    alloc = layerwise.DiskArrays(arrays, a.resume) if a.moe_arrays == "disk" else None
    if a.consume_checkpoint and a.moe_arrays == "disk":
        alloc = ConsumingArrays(arrays, ckpt)
    args = (dense, cfg, stats, a.remain_rate, router, rcfg, batches, a.seed, None, alloc, False)
    params, spec = meter.stage("refactor", layerwise.refactor_per_layer, *args, resume_dir=resume)
    del dense
    if a.consume_checkpoint:  # the dense layers are not read again: room for the save
        shutil.rmtree(ckpt, ignore_errors=True)
    rc = ReadMEConfig(cfg, mcfg, router)
    meta = {"recipe": record, "stage": "refactor"}
    meter.stage("save", models.save_readme, moe_dir, params, rc, spec, meta)
    del params
    shutil.rmtree(arrays, ignore_errors=True)
    sw, ew = spec.shared_widths, spec.expert_widths
    return {"shared_width_mean": float(sw.mean()), "expert_width_mean": float(ew.mean())}


def _prompt(m: models.ReadMEModel) -> list[int]:
    return _prompt_ids(m.rc.model.vocab_size)


def generate(m: models.ReadMEModel, n: int, layout: str = "trimmed") -> list[int]:
    """n greedy tokens through the Generator's cached decode step. layout "trimmed": the serving
    decode layout, a second copy of the weights (per-layer lists, experts trimmed, shared +
    expert fused); "stacked": the loaded arrays, the layers as a scan (the weights once)."""
    return Generator(readme_model(m.rc, layout=layout), m.params).generate([_prompt(m)], n)[0]


def generate_forward(m: models.ReadMEModel, n: int) -> list[int]:
    """n greedy tokens by the model's own full forward (router + stacked backbone, as loaded; no
    KV cache, no second copy of the weights): one compiled forward over the prompt plus n
    positions, causal, so the positions not yet generated do not change the logits read. The
    layers run as a scan: unrolled, XLA:CPU materialises every layer's weight slices at once
    (4.04 GB of temporaries for the 8-layer paper-width model; 0.51 GB as a scan)."""
    ids = _prompt(m)
    p = len(ids)
    rc = m.rc.replace(model=m.rc.model.replace(scan_layers=True))
    fwd = jax.jit(lambda params, t: readme_forward(params, t, rc)[0])
    toks = np.zeros((1, p + n), np.int32)
    toks[0, :p] = ids
    out = []
    for i in range(n):
        logits = fwd(m.params, jnp.asarray(toks))
        nxt = int(jnp.argmax(logits[0, p + i - 1]))
        toks[0, p + i] = nxt
        out.append(nxt)
    return out


def serve_dense(a, meter: RssMeter, ckpt: Path) -> dict:
    """The written dense checkpoint served in bf16 through the Generator in decode layout
    `a.serve_dense`: stages "load" (readme_jax.load) and "generate" (the layout prepared, the
    decode step compiled, a.new_tokens greedy tokens), as `readme_jax.load(...,
    layout=)` serves it. Returns the serving figures: weight
    bytes, steady RSS (after generating) and stage peaks as multiples of them, decode tokens/s
    after the first token, and the batch-1 bound (read bandwidth / weight bytes per token)."""
    bw = read_bandwidth_gbs()  # before the load: its 1 GB buffer is freed again
    # readme_jax.load's dense path without a tokenizer (the random checkpoint has none)
    cfg, params = meter.stage("load", hf.load_hf, ckpt, "bfloat16")
    m = LoadedModel(cfg, params, tokenizer=None, layout=a.serve_dense)
    del params
    wbytes = sum(x.nbytes for x in jax.tree.leaves(m.params))
    per_token = token_bytes(m.params)
    times: list[float] = []

    def run() -> list[int]:
        toks = []
        for step in m.generator().stream([_prompt_ids(cfg.vocab_size)], a.new_tokens, eos_ids=[]):
            times.append(time.perf_counter())
            toks.append(int(step[0]))
        return toks

    toks = meter.stage("generate", run)
    load, gen = meter.rows[-2], meter.rows[-1]
    rate = (len(times) - 1) / (times[-1] - times[0]) if len(times) > 1 else float("nan")
    out = {
        "layout": a.serve_dense,
        "weight_bytes": wbytes,
        "token_bytes": per_token,
        "bandwidth_gbs": bw,
        "decode_tok_s": rate,
        "bound_tok_s": bw * GB / per_token,
        "load_peak_x": load["peak_anon_gb"] * GB / wbytes,
        "generate_peak_x": gen["peak_anon_gb"] * GB / wbytes,
        "steady_x": gen["rss_after_gb"] * GB / wbytes,
        "tokens": toks,
    }
    print(
        f"dense bf16, layout {a.serve_dense}: weights {wbytes / GB:.2f} GB; load peak "
        f"{out['load_peak_x']:.2f}x, generate peak {out['generate_peak_x']:.2f}x (anonymous), "
        f"steady {out['steady_x']:.2f}x; decode {rate:.3f} tok/s, bound {out['bound_tok_s']:.2f} "
        f"({rate / out['bound_tok_s']:.0%}); tokens {toks}"
    )
    return out


def serve_dense_layouts(a) -> list[dict]:
    """`--serve-dense both`: each decode layout served in its own process (the memory figures are
    per process), the first writing the checkpoint that the second reads; prints a markdown
    table and returns the rows (serve_dense's figures)."""
    work = Path(a.dir)
    base = [sys.executable, str(Path(__file__).resolve())]
    for flag in ("layers", "dim", "ffn", "heads", "vocab", "new_tokens", "seed", "channel_spread"):
        base += [f"--{flag.replace('_', '-')}", str(getattr(a, flag))]
    base += ["--max-rss-gb", str(a.max_rss_gb), "--min-free-gb", str(a.min_free_gb)]
    rows = []
    try:
        for i, layout in enumerate(LAYOUTS):
            out = work / f"serve_{layout}.json"
            src = (
                ["--dir", str(work), "--keep"]
                if i == 0
                else ["--from-dense", str(work / "dense_hf")]
            )
            work.mkdir(parents=True, exist_ok=True)
            cmd = base + ["--serve-dense", layout, "--json", str(out), *src]
            if subprocess.run(cmd).returncode != 0:
                raise SystemExit(f"the {layout} layout's process failed")
            rows.append(json.loads(out.read_text()))
    finally:
        if not a.keep:
            shutil.rmtree(work, ignore_errors=True)
    head = "layout | load s / peak | generate peak | steady | decode tok/s | bound tok/s | of bound"
    print(f"\n| {head} |\n|---|---|---|---|---|---|---|")
    for r in rows:
        load = next(s["wall_s"] for s in r["stages"] if s["stage"] == "load")
        rate, bound = r["decode_tok_s"], r["bound_tok_s"]
        cells = [r["layout"], f"{load:.0f} / {r['load_peak_x']:.2f}x"]
        cells += [f"{r['generate_peak_x']:.2f}x", f"{r['steady_x']:.2f}x"]
        cells += [f"{rate:.2f}", f"{bound:.2f}", f"{rate / bound:.0%}"]
        print("| " + " | ".join(cells) + " |")
    return rows


def _prompt_ids(vocab: int) -> list[int]:
    return [1, *(np.arange(1, 8) * 997 % vocab).tolist()]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--dim", type=int, default=4096)
    ap.add_argument("--ffn", type=int, default=11008)
    ap.add_argument("--heads", type=int, default=32)
    ap.add_argument("--vocab", type=int, default=32000)
    ap.add_argument("--domains", type=int, default=4, help="experts (one per token domain)")
    ap.add_argument("--seqs", type=int, default=4, help="calibration sequences per domain")
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--refit-seqs", type=int, default=0, help="refit rows per domain (0 = all)")
    ap.add_argument("--remain-rate", type=float, default=0.5)
    ap.add_argument("--ridge", type=float, default=1e-2)
    ap.add_argument(
        "--dense",
        choices=("disk", "resident"),
        default="disk",
        help="dense layers read per layer from the checkpoint, or loaded whole (hf.load_hf)",
    )
    ap.add_argument(
        "--moe-arrays",
        choices=("host", "disk"),
        default="host",
        help="where the Read-ME backbone's arrays are built: host memory or mapped files",
    )
    ap.add_argument(
        "--consume-checkpoint",
        action="store_true",
        help="write one layer per shard; with --moe-arrays disk delete each shard once its layers "
        "are built, with host arrays the checkpoint after the refactor (a disk without room for "
        "both models)",
    )
    ap.add_argument(
        "--resume",
        action="store_true",
        help="keep the work directory when stopped, and on a rerun reuse its checkpoint and "
        "statistics and continue the refactor at its first unfinished layer",
    )
    ap.add_argument("--channel-spread", type=float, default=0.1)
    ap.add_argument("--new-tokens", type=int, default=4)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--dir", default="runs/scale_test", help="work directory (deleted after)")
    ap.add_argument("--keep", action="store_true", help="keep the checkpoints in --dir")
    ap.add_argument("--max-rss-gb", type=float, default=0.0, help="abort above this RSS")
    ap.add_argument(
        "--min-free-gb", type=float, default=1.0, help="abort when the machine has less left"
    )
    ap.add_argument("--json", default="", help="also write the figures to this file")
    ap.add_argument(
        "--generate",
        choices=("decode", "stacked", "forward"),
        default="decode",
        help="decode: the cached decode step in the serving layout (a second copy of the "
        "weights); stacked: the cached decode step over the loaded arrays (the weights once); "
        "forward: the model's own forward without a cache, one per token (the weights once)",
    )
    ap.add_argument(
        "--serve-dense",
        choices=(*LAYOUTS, "both"),
        default=None,
        help="no conversion: serve the dense checkpoint (written, or --from-dense) in bf16 "
        "through the Generator in this decode layout; prints load time, peak and steady memory "
        "against the weight bytes, and decode tokens/s against the bandwidth bound. both: each "
        "layout in its own process, one table (make bench-paper)",
    )
    ap.add_argument("--from-dense", default="", help="with --serve-dense: an existing checkpoint")
    ap.add_argument(
        "--from-moe",
        default="",
        help="skip writing and converting: load this Read-ME model directory and generate",
    )
    a = ap.parse_args()
    if a.resume and a.consume_checkpoint:  # a rerun could not open the consumed checkpoint
        ap.error("--resume and --consume-checkpoint cannot be combined")

    meter = RssMeter(a.max_rss_gb, a.min_free_gb)
    meter.json_path = a.json
    work = Path(a.dir)
    ckpt, moe_dir = work / "dense_hf", work / "moe_init"
    cfg = paper_config(a)
    finished = False
    if not (a.keep or a.resume):
        meter.on_abort = lambda: shutil.rmtree(work, ignore_errors=True)
    gen = {
        "decode": generate,
        "stacked": functools.partial(generate, layout="stacked"),
        "forward": generate_forward,
    }[a.generate]
    if a.from_moe:  # the model of an earlier conversion: its load and generation only
        m = meter.stage("load MoE", models.load_readme, a.from_moe)
        toks = meter.stage("generate", gen, m, a.new_tokens)
        moe_bytes = sum(f.stat().st_size for f in Path(a.from_moe).rglob("*") if f.is_file())
        # in memory: the zero padding of the stacked experts, compressed on disk, is held in full
        wbytes = sum(x.nbytes for x in jax.tree.leaves(m.params))
        print(
            f"tokens {toks}; MoE on disk {moe_bytes / GB:.2f} GB, in memory {wbytes / GB:.2f} GB "
            f"({a.generate})"
        )
        if a.json:
            out = {"args": vars(a), "moe_bytes": moe_bytes, "weight_bytes": wbytes}
            out |= {"stages": meter.rows, "tokens": toks}
            Path(a.json).write_text(json.dumps(out, indent=2))
        return
    if a.serve_dense == "both":
        rows = serve_dense_layouts(a)
        if a.json:
            Path(a.json).write_text(json.dumps({"args": vars(a), "rows": rows}, indent=2))
        return
    if a.serve_dense:
        src = Path(a.from_dense) if a.from_dense else ckpt
        try:
            if not a.from_dense:
                meter.stage(
                    "write", hf.write_hf, ckpt, cfg, random_tensor(a.channel_spread, a.seed)
                )
            res = serve_dense(a, meter, src)
        finally:
            if not (a.keep or a.from_dense):
                shutil.rmtree(work, ignore_errors=True)
        if a.json:
            Path(a.json).write_text(
                json.dumps({"args": vars(a), "stages": meter.rows} | res, indent=2)
            )
        return
    try:
        shard = cfg.param_count() * 2 // (cfg.n_layers + 1) if a.consume_checkpoint else 5 * GB
        tensors = random_tensor(a.channel_spread, a.seed)
        if not (a.resume and (ckpt / "config.json").exists()):
            meter.stage("write", hf.write_hf, ckpt, cfg, tensors, int(shard))
        ckpt_bytes = cfg.param_count() * 2  # bf16 (shards may be consumed on a rerun)
        print(f"checkpoint: {cfg.param_count() / 1e9:.2f}B params, {ckpt_bytes / GB:.2f} GB")
        widths = convert(a, meter, ckpt, moe_dir)
        gc.collect()
        m = meter.stage("load MoE", models.load_readme, moe_dir)
        toks = meter.stage("generate", gen, m, a.new_tokens)
        moe_bytes = sum(f.stat().st_size for f in moe_dir.rglob("*") if f.is_file())
        finished = True
    except CheckpointError as e:  # e.g. no room on disk for the Read-ME model: say where
        print(f"stopped in stage {meter.current!r}: {e}", flush=True)
        finished = True
        raise SystemExit(4) from e
    finally:  # an interrupted --resume run keeps its work for the rerun
        if not a.keep and (finished or not a.resume):
            shutil.rmtree(work, ignore_errors=True)
    conv = [r for r in meter.rows if r["stage"] not in ("write", "load MoE", "generate")]
    peak = max(r["peak_gb"] for r in conv)
    anon = max(r["peak_anon_gb"] for r in conv)
    print(
        f"tokens {toks}; widths {widths}; MoE on disk {moe_bytes / GB:.2f} GB; conversion peak "
        f"{peak:.2f} GB = {peak * GB / ckpt_bytes:.2f} x the checkpoint's bytes (anonymous "
        f"{anon:.2f} GB = {anon * GB / ckpt_bytes:.2f} x)"
    )
    if a.json:
        out = {"args": vars(a), "checkpoint_bytes": ckpt_bytes, "moe_bytes": moe_bytes}
        out |= {"stages": meter.rows, "widths": widths, "conversion_peak_gb": peak, "tokens": toks}
        out["conversion_peak_anon_gb"] = anon
        Path(a.json).write_text(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
