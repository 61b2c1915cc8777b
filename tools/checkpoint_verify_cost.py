"""What verifying a saved model's checksums costs at load: SmolLM2-135M refactored into a Read-ME
MoE (the bundled GGUF's weights; a random expert split at remain rate 0.5 over 4 experts, so no
calibration data is needed: the files have the real model's size and layout), saved once with
`save_readme`, then loaded with `load_readme` three ways, `--repeats` times each:

  off   verify=False: orbax restore only
  cold  every file hashed (sha256): a fresh verification record, as on a first load
  warm  the record of an earlier check matches every file: nothing hashed

  python tools/checkpoint_verify_cost.py [--repeats 3] [--out DIR]

The files sit in the page cache (just written), so `cold` measures hashing, not the disk.
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np

from readme_jax.checkpoints import models, store
from readme_jax.model import llama
from readme_jax.model.config import MoEConfig, ReadMEConfig, RouterConfig
from readme_jax.refactor.experts import build_expert_spec, build_moe_params
from readme_jax.testing import np_init


def build(out: Path) -> Path:
    cfg, dense, _ = models.load_dense("")
    E, rng = 4, np.random.default_rng(0)
    rc = ReadMEConfig(cfg, MoEConfig(E), RouterConfig())
    spec = build_expert_spec(rng.random((E, cfg.n_layers, cfg.ffn_dim)), 0.5, list("abcd"))
    router = np_init(llama.param_shapes(rc.router.backbone(cfg)), rng)
    router["head"] = (0.3 * rng.standard_normal((rc.router.dim, E))).astype(np.float32)
    params = {"backbone": build_moe_params(dense, spec), "router": router}
    meta = {"recipe": {"checkpoint": models.BUNDLED}}
    return models.save_readme(out / "moe", params, rc, spec, meta)


def timed(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--out", default=None, help="where to save the model (default: a temp dir)")
    a = ap.parse_args()
    out = Path(a.out or tempfile.mkdtemp(prefix="verify_cost_"))
    path = build(out)
    files = store.manifest(path)["files"]
    nbytes = sum(f["size"] for f in files.values())
    print(f"{path}: {len(files)} files, {nbytes / 2**20:.0f} MiB")
    cache = out / "cache"
    os.environ["READMEJAX_CACHE_DIR"] = str(cache)
    rows = {"off": [], "cold": [], "warm": []}
    for _ in range(a.repeats):
        rows["off"].append(timed(lambda: models.load_readme(path, verify=False)))
        for rec in (cache / "verified").glob("*.json"):
            rec.unlink()  # a first load: hash everything
        rows["cold"].append(timed(lambda: models.load_readme(path)))
        rows["warm"].append(timed(lambda: models.load_readme(path)))
    hash_s = timed(lambda: [store._sha256(path / f) for f in files])
    print(f"sha256 alone over every file: {hash_s:.2f} s ({nbytes / 2**20 / hash_s:.0f} MiB/s)")
    base = statistics.median(rows["off"])
    print("| load | median s | min s | vs off |\n|---|---|---|---|")
    for k, v in rows.items():
        med = statistics.median(v)
        print(f"| {k} | {med:.2f} | {min(v):.2f} | {med - base:+.2f} s |")


if __name__ == "__main__":
    main()
