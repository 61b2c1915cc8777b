"""Shared setup for the training tests: a tiny random teacher, four real-text domains from
tests/fixtures/corpus tokenized to bytes, and the refactored Read-ME model in a run directory.
(No tests here; the other test_train_* modules import it.)"""

from __future__ import annotations

import copy
import json
import shutil
import sys
from pathlib import Path

import jax
from ml_collections import ConfigDict

from readme_jax.checkpoints import models
from readme_jax.model import llama
from readme_jax.model.config import LlamaConfig, MoEConfig, ReadMEConfig, RouterConfig
from readme_jax.refactor import pipeline as rp
from readme_jax.refactor.layerwise import refactor_per_layer
from readme_jax.refactor.reconstruct import ReconstructConfig
from readme_jax.train import loop

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # configs/ is a top-level package of the repository
    sys.path.insert(0, str(ROOT))
CORPUS = ROOT / "tests" / "fixtures" / "corpus"
SEQ = 32


class ByteTokenizer:
    """UTF-8 bytes; id 0 is EOS (text never contains NUL)."""

    name = "bytes-test"
    eos_id = 0
    vocab_size = 256

    def encode(self, text: str, add_bos=None) -> list[int]:
        return list(text.encode("utf-8"))


def _domains(root: Path) -> dict[str, str]:
    """pride, persuasion (its two chapters cut into six documents), drama, whaling."""
    src = root / "src"
    (src / "pride").mkdir(parents=True, exist_ok=True)
    (src / "persuasion").mkdir(parents=True, exist_ok=True)
    for f in sorted((CORPUS / "austen").glob("prideprejudice*.txt")):
        shutil.copy(f, src / "pride" / f.name)
    for f in sorted((CORPUS / "austen").glob("persuasion*.txt")):
        text = f.read_text()
        cut = len(text) // 3
        for i in range(3):
            (src / "persuasion" / f"{f.stem}_{i}.txt").write_text(text[i * cut : (i + 1) * cut])
    return {
        "pride": str(src / "pride"),
        "persuasion": str(src / "persuasion"),
        "drama": str(CORPUS / "shakespeare"),
        "whaling": str(CORPUS / "melville.jsonl"),
    }


def teacher_cfg() -> LlamaConfig:
    return LlamaConfig(
        vocab_size=256,
        dim=32,
        n_layers=2,
        n_heads=4,
        n_kv_heads=2,
        ffn_dim=64,
        tie_embeddings=True,
        max_seq_len=256,
        eos_ids=(0,),
    )


def make_config(root: Path, domains: dict[str, str]) -> ConfigDict:
    from configs.tiny import get_config

    c = get_config()
    c.run_dir = str(root / "run")
    c.model.checkpoint = "random:test"  # the teacher is passed in
    c.data.domains = ",".join(f"{k}={v}" for k, v in domains.items())
    c.data.cache = str(root / "cache")
    c.train.rounds = 2
    c.train.router_steps = 2
    c.train.expert_steps = 2
    c.train.batch_size = 4
    c.train.seq_len = SEQ
    c.train.save_every = 2
    c.train.head_chunk = 64
    c.train.router_lr = 1e-2
    c.train.expert_lr = 1e-2
    c.train.save_router_snapshot = False
    c.train.num_threads = 1
    c.mesh.data = 1  # one device (tests run with 8 fake ones)
    return c


def build(root: Path):
    """(config, tokenizer, (teacher cfg, params)) with RUN/moe_init written under root/run."""
    tok = ByteTokenizer()
    domains = _domains(root)
    c = make_config(root, domains)
    cfg = teacher_cfg()
    dense = llama.init_params(cfg, jax.random.key(0))
    recipe = {"test": True}
    batches = rp.calibration_batches(domains, tok, 4, SEQ, "train", c.data.cache, seed=0)
    stats = rp.calibrate(cfg, dense, batches, recipe, Path(c.run_dir) / "calib")
    mcfg = MoEConfig(len(domains), 1, False, "ragged")
    rcfg = RouterConfig(16, 2, 32)
    no_refit = ReconstructConfig("none")  # channel selection only: the refit is not under test
    params, spec = refactor_per_layer(dense, cfg, stats, 0.5, rcfg, no_refit, None, seed=0)
    models.save_readme(
        Path(c.run_dir) / "moe_init",
        params,
        ReadMEConfig(cfg, mcfg, rcfg),
        spec,
        {"recipe": recipe},
    )
    return c, tok, (cfg, dense)


def copy_run(c: ConfigDict, dest: Path) -> ConfigDict:
    """A fresh run directory holding the same moe_init and calib."""
    dest.mkdir(parents=True, exist_ok=True)
    for sub in ("moe_init", "calib"):
        shutil.copytree(Path(c.run_dir) / sub, dest / sub)
    c2 = copy.deepcopy(c)
    c2.run_dir = str(dest)
    return c2


def first_router_loss(c: ConfigDict, tok, teacher, dest: Path, **train) -> float:
    """The loss of the first router step of a fresh copy of the run with `c.train` keys
    overridden by `train` (one round, one router step, no expert phase)."""
    c = copy_run(c, dest)
    c.train.rounds, c.train.router_steps, c.train.expert_steps = 1, 1, 0
    for k, v in train.items():
        c.train[k] = v
    loop.run_training(c, Path(c.run_dir), tokenizer=tok, teacher=teacher)
    path = Path(c.run_dir) / "train" / "readme" / "metrics.jsonl"
    return json.loads(path.read_text().splitlines()[0])["loss"]
