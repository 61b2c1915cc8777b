"""The conversion pipeline: dense checkpoint -> calibration statistics -> experts -> MoE checkpoint.

Each step is a function with a typed input and output; `launch/train.py` chains them and skips a
step whose output already exists in the run directory.
"""

from __future__ import annotations

import dataclasses
import json
import time
from pathlib import Path
from typing import Any

import jax
import numpy as np

from readme_jax.checkpoints import store
from readme_jax.checkpoints.errors import CheckpointError
from readme_jax.checkpoints.tokenizer import Tokenizer, load_tokenizer
from readme_jax.model import llama
from readme_jax.model.config import LlamaConfig, MoEConfig, ReadMEConfig, RouterConfig
from readme_jax.model.router import init_layerwise_gates, init_router
from readme_jax.refactor.experts import ExpertSpec, build_expert_spec, build_moe_params
from readme_jax.refactor.stats import ActivationStats, collect_stats


def _parse_random(spec: str) -> dict[str, int]:
    kv = dict(p.split("=") for p in spec.split(":", 1)[1].split(","))
    return {k: int(v) for k, v in kv.items()}


def load_dense(checkpoint: str = "", dtype: str = "float32", scan_layers: bool = False, seed=0):
    """(cfg, params, tokenizer). "" = bundled SmolLM2; "random:vocab=..,dim=.." = random init
    with the SmolLM2 tokenizer (tests); else a .gguf file or a Hugging Face directory."""
    if checkpoint.startswith("random:"):
        r = _parse_random(checkpoint)
        cfg = LlamaConfig(
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
        return cfg, llama.init_params(cfg, jax.random.key(seed)), load_tokenizer()
    path = checkpoint or None
    if path is None or str(path).endswith(".gguf"):
        from readme_jax.checkpoints.gguf import load_gguf

        cfg, params = load_gguf(path, dtype=dtype, scan_layers=scan_layers)
    else:
        from readme_jax.checkpoints.hf import load_hf

        cfg, params = load_hf(path, dtype=dtype, cfg_overrides={"scan_layers": scan_layers})
    return cfg, params, load_tokenizer(path)


def parse_domains(spec: str) -> dict[str, str | None]:
    """ "fiction,legal=/data/legal.jsonl" -> {"fiction": None, "legal": "/data/legal.jsonl"}."""
    out: dict[str, str | None] = {}
    for part in [p.strip() for p in spec.split(",") if p.strip()]:
        name, _, path = part.partition("=")
        out[name] = path or None
    if len(out) < 2:
        raise ValueError(f"need at least 2 domains (one expert each), got {list(out)}")
    return out


def calibration_batches(
    domains: dict[str, str | None],
    tokenizer: Tokenizer,
    num_sequences: int,
    seq_len: int,
    split: str = "train",
    cache: str | None = None,
    batch_size: int = 4,
    seed: int = 0,
) -> dict[str, list[np.ndarray]]:
    """Per domain, [b, S] token batches for statistics (positions across documents masked -1)."""
    from readme_jax.data import calibration_batch, prepare_domains

    prepare_domains({k: v for k, v in domains.items()}, cache=cache)
    out = {}
    for name in domains:
        b = calibration_batch(
            name, split, tokenizer, num_sequences, seq_len, seed=seed, cache=cache
        )
        toks = b["tokens"].astype(np.int64)
        out[name] = [toks[i : i + batch_size] for i in range(0, len(toks), batch_size)]
    return out


def calibrate(
    cfg: LlamaConfig,
    params: Any,
    domain_batches: dict[str, list[np.ndarray]],
    recipe: dict[str, Any],
    out_dir: str | Path | None = None,
) -> ActivationStats:
    if out_dir is not None and (Path(out_dir) / "stats.json").exists():
        st = ActivationStats.load(out_dir)
        if st.recipe == recipe:
            return st
    st = collect_stats(params, cfg, domain_batches, recipe)
    if out_dir is not None:
        st.save(out_dir)
    return st


def refactor(
    dense: Any,
    cfg: LlamaConfig,
    stats: ActivationStats,
    remain_rate: float,
    mcfg: MoEConfig,
    rcfg: RouterConfig,
    seed: int = 0,
) -> tuple[dict[str, Any], ExpertSpec]:
    """Read-ME params {"backbone", "router"} (and layer-wise gates for the baseline)."""
    spec = build_expert_spec(stats.mean_abs_ExLxF, remain_rate, stats.domains)
    k_router, k_gates = jax.random.split(jax.random.key(seed))
    gates = init_layerwise_gates(cfg, spec.num_experts, k_gates)
    backbone = build_moe_params(llama.stack_layers(dense), spec, gates_LxDxE=gates)
    router = init_router(rcfg, cfg, spec.num_experts, k_router, backbone_embed_VxD=dense["embed"])
    return {"backbone": backbone, "router": router}, spec


def save_readme(
    path: str | Path,
    params: dict[str, Any],
    rc: ReadMEConfig,
    spec: ExpertSpec,
    extra: dict[str, Any] | None = None,
) -> Path:
    path = Path(path)
    spec.save(path / "experts")
    meta = {
        "kind": "readme_moe",
        "config": rc.to_dict(),
        "saved_at": time.strftime("%Y-%m-%dT%H:%M:%S"),
        **(extra or {}),
    }
    return store.save_model(path, params, meta)


@dataclasses.dataclass
class ReadMEModel:
    rc: ReadMEConfig
    params: dict[str, Any]
    spec: ExpertSpec
    meta: dict[str, Any]


def load_readme(path: str | Path) -> ReadMEModel:
    meta = store.read_meta(path)
    if meta.get("kind") != "readme_moe":
        raise CheckpointError(f"{path} holds a {meta.get('kind')!r} model, not a Read-ME MoE")
    rc = ReadMEConfig.from_dict(meta["config"])
    params = store.load_params(path)
    spec = ExpertSpec.load(Path(path) / "experts")
    return ReadMEModel(rc, params, spec, meta)


def write_refactor_report(path: Path, spec: ExpertSpec, stats: ActivationStats, F: int) -> dict:
    from readme_jax.refactor.experts import active_ffn_fraction

    rep = {
        "domains": spec.domains,
        "remain_rate": spec.remain_rate,
        "calibration_tokens": dict(zip(stats.domains, stats.n_tokens, strict=True)),
        "shared_widths": spec.shared_widths.tolist(),
        "expert_widths": spec.expert_widths.tolist(),
        "ffn_dim": F,
        "active_ffn_fraction": active_ffn_fraction(spec, F),
    }
    path.mkdir(parents=True, exist_ok=True)
    (path / "refactor.json").write_text(json.dumps(rep, indent=2))
    sw = spec.shared_widths
    lines = [
        f"# Refactor report (remain rate {spec.remain_rate})",
        "",
        f"Domains (one expert each): {', '.join(spec.domains)}; calibration tokens per domain: "
        f"{', '.join(str(n) for n in stats.n_tokens)}.",
        "",
        f"Shared channels per layer: min {sw.min()}, mean {sw.mean():.0f}, max {sw.max()} of {F}. "
        f"Active FFN fraction per token: {rep['active_ffn_fraction']:.3f}.",
        "",
        "| layer | shared | " + " | ".join(spec.domains) + " |",
        "|---|---|" + "---|" * len(spec.domains),
    ]
    for l in range(len(sw)):
        lines.append(
            f"| {l} | {sw[l]} | " + " | ".join(str(w) for w in spec.expert_widths[l]) + " |"
        )
    (path / "refactor.md").write_text("\n".join(lines) + "\n")
    return rep
