"""The dense -> Read-ME pipeline, wired once: calibrate (cached) -> experts -> MoE parameters.

  recipe = Recipe(checkpoint="", domains="fiction,drama,code_docs,manual", remain_rate=0.5)
  built = build_readme(recipe, calib_dir="runs/x/calib")   # Built(model, stats, tokenizer)
  models.save_readme("runs/x/moe_init", built.model.params, built.model.rc, built.model.spec,
                     built.model.meta)

`launch/train.py` (the calibrate and refactor stages), serving on the fly (`serve/bench/models.py`)
and `tools/bench.py` all call `build_readme`; each step is also a function of its own
(`calibration_batches`, `calibrate`, `refactor`) for tests and tools. Statistics are cached in
`calib_dir` and reused when the recorded recipe matches (`ActivationStats.recipe`).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from pathlib import Path
from typing import Any

import jax
import numpy as np

from readme_jax.checkpoints import models
from readme_jax.checkpoints.tokenizer import Tokenizer
from readme_jax.data import calibration_batch, prepare_domains
from readme_jax.model import llama
from readme_jax.model.config import (
    DISPATCH_MODES,
    ConfigError,
    LlamaConfig,
    MoEConfig,
    ReadMEConfig,
    RouterConfig,
)
from readme_jax.model.router import init_layerwise_gates, init_router
from readme_jax.model.spec import ExpertSpec
from readme_jax.refactor.cluster import cluster_stats
from readme_jax.refactor.experts import active_ffn_fraction, build_expert_spec, build_moe_params
from readme_jax.refactor.stats import ActivationStats, collect_stats

DEFAULT_DOMAINS = "fiction,drama,code_docs,manual"
# Recipe field -> the run config key that sets it (configs/smollm2_135m.py), for messages
RUN_CONFIG_KEYS = {
    "remain_rate": "refactor.remain_rate",
    "num_sequences": "calib.num_sequences",
    "seq_len": "calib.seq_len",
    "clusters": "refactor.num_clusters",
    "top_k": "moe.top_k",
    "dispatch": "moe.dispatch",
    "dtype": "model.dtype",
}


@dataclasses.dataclass(frozen=True)
class Recipe:
    """Everything that determines a refactored (untrained) Read-ME model.

    checkpoint: the dense source (`checkpoints.models.discover`; "" = bundled SmolLM2).
    domains: "name[=path],..." (>= 2; one expert each unless `clusters` > 0).
    num_sequences, seq_len, split: calibration text per domain (sequences x tokens).
    clusters: 0 = one expert per domain; k > 0 = k experts from k-means clusters of pooled
    token activations (`refactor/cluster.py`).
    """

    checkpoint: str = ""
    domains: str = DEFAULT_DOMAINS
    num_sequences: int = 4
    seq_len: int = 256
    split: str = "train"
    seed: int = 0
    remain_rate: float = 0.5
    clusters: int = 0
    dtype: str = "float32"
    scan_layers: bool = False
    data_cache: str | None = None
    top_k: int = 1
    gate_scaling: bool = False
    dispatch: str = "ragged"
    router: RouterConfig = dataclasses.field(default_factory=RouterConfig)

    def check(self, keys: dict[str, str] | None = None) -> Recipe:
        """Raise ConfigError, in one line naming the key, the value and the allowed range, for
        the first value that cannot build a model; `keys` maps a field to the config key that
        set it (for the message). Cheap: reads no checkpoint and no data. Returns self."""
        keys = keys or {}
        F = self.router
        rules = [
            ("remain_rate", 0 < self.remain_rate <= 1, "(0, 1]: the fraction of FFN channels kept"),
            ("num_sequences", self.num_sequences >= 1, ">= 1"),
            ("seq_len", self.seq_len >= 2, ">= 2"),
            ("clusters", self.clusters >= 0, ">= 0"),
            ("top_k", self.top_k >= 1, ">= 1"),
            ("dispatch", self.dispatch in DISPATCH_MODES, f"one of {list(DISPATCH_MODES)}"),
            ("dtype", self.dtype in ("float32", "bfloat16"), "float32 or bfloat16"),
            ("router.dim", F.dim >= 1 and F.dim % max(F.n_heads, 1) == 0, "a multiple of n_heads"),
            ("router.n_heads", F.n_heads >= 1, ">= 1"),
            ("router.ffn_dim", F.ffn_dim >= 1, ">= 1"),
        ]
        for field, ok, allowed in rules:
            if not ok:
                key = keys.get(field, field)
                node, _, leaf = field.rpartition(".")
                value = getattr(getattr(self, node) if node else self, leaf)
                raise ConfigError(f"{key}={value!r} is out of range: allowed {allowed}")
        return self

    @classmethod
    def from_config(cls, c: Any) -> Recipe:
        """From a run config (configs/smollm2_135m.py's fields), checked (`check`, naming the
        config keys); raises ConfigError before any work."""
        k = (c.refactor.num_clusters or len(parse_domains(c.data.domains))) * bool(
            c.refactor.clustering
        )
        if c.refactor.num_clusters < 0:
            raise ConfigError(f"refactor.num_clusters={c.refactor.num_clusters} must be >= 0")
        return cls(
            checkpoint=c.model.checkpoint,
            domains=c.data.domains,
            num_sequences=c.calib.num_sequences,
            seq_len=c.calib.seq_len,
            split=c.calib.split,
            seed=c.seed,
            remain_rate=c.refactor.remain_rate,
            clusters=k,
            dtype=c.model.dtype,
            scan_layers=c.model.scan_layers,
            data_cache=c.data.cache or None,
            top_k=c.moe.top_k,
            gate_scaling=c.moe.gate_scaling,
            dispatch=c.moe.dispatch,
            router=RouterConfig(c.router.dim, c.router.n_heads, c.router.ffn_dim),
        ).check(RUN_CONFIG_KEYS)

    def batches(self, tok: Tokenizer) -> dict[str, list[np.ndarray]]:
        """The recipe's calibration batches per domain (`calibration_batches`)."""
        return calibration_batches(
            parse_domains(self.domains),
            tok,
            self.num_sequences,
            self.seq_len,
            self.split,
            self.data_cache,
            seed=self.seed,
        )

    def record(self, tokenizer_name: str) -> dict[str, Any]:
        """What the statistics (and the MoE's model.json) record of this recipe: the keys that
        decide the statistics, so a cached `stats.json` is reused only when they match."""
        rec = {
            "checkpoint": models.recipe_name(self.checkpoint),
            "domains": self.domains,
            "num_sequences": self.num_sequences,
            "seq_len": self.seq_len,
            "split": self.split,
            "seed": self.seed,
            "tokenizer": tokenizer_name,
        }
        return rec | ({"clusters": self.clusters} if self.clusters else {})


@dataclasses.dataclass
class Built:
    model: models.ReadMEModel  # meta = {"recipe": ..., "stage": "refactor"}
    stats: ActivationStats
    tokenizer: Tokenizer
    dense_cfg: LlamaConfig


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
    """Per domain, [B, S] token batches for statistics (positions across documents masked -1);
    a domain with fewer than `num_sequences` rows gives all it has (statistics record the
    tokens per domain)."""
    prepare_domains(dict(domains), cache=cache)
    out = {}
    for name in domains:
        b = calibration_batch(
            name,
            split,
            tokenizer,
            num_sequences,
            seq_len,
            seed=seed,
            cache=cache,
            allow_fewer=True,
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
    """Per-domain activation statistics; reuses out_dir/stats.json if its recipe matches."""
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


def cache_dir(recipe: Recipe, tokenizer_name: str, root: str | Path) -> Path:
    """root/calib-<hash of the recipe record>: a statistics cache shared by identical recipes."""
    rec = json.dumps(recipe.record(tokenizer_name), sort_keys=True)
    return Path(root) / f"calib-{hashlib.sha256(rec.encode()).hexdigest()[:12]}"


def calibrate_recipe(
    recipe: Recipe,
    source: tuple[LlamaConfig, Any, Tokenizer],
    calib_dir: str | Path | None = None,
) -> ActivationStats:
    """Statistics of `source` = (cfg, params, tokenizer) on the recipe's calibration text."""
    cfg, dense, tok = source
    rec = recipe.record(tok.name)
    batches = recipe.batches(tok)
    if not recipe.clusters:
        return calibrate(cfg, dense, batches, rec, calib_dir)
    if calib_dir is not None and (Path(calib_dir) / "stats.json").exists():
        st = ActivationStats.load(calib_dir)
        if st.recipe.get("clusters") == recipe.clusters:
            return st
    pooled = [b for bs in batches.values() for b in bs]
    st = cluster_stats(dense, cfg, pooled, recipe.clusters, rec, seed=recipe.seed)
    if calib_dir is not None:
        st.save(calib_dir)
    return st


def build_readme(
    recipe: Recipe,
    calib_dir: str | Path | None = None,
    *,
    calib_root: str | Path | None = None,
    source: tuple[LlamaConfig, Any, Tokenizer] | None = None,
    stats: ActivationStats | None = None,
) -> Built:
    """The untrained Read-ME model of `recipe`: load the dense source (unless `source` is given),
    calibrate (cached in `calib_dir`, or in `calib_root`/calib-<recipe hash>; or use `stats`),
    build experts and the MoE parameters. Raises ConfigError (`Recipe.check`) before loading."""
    recipe.check()
    cfg, dense, tok = source or models.load_dense(
        recipe.checkpoint, recipe.dtype, recipe.scan_layers, recipe.seed
    )
    if calib_dir is None and calib_root is not None:
        calib_dir = cache_dir(recipe, tok.name, calib_root)
    if stats is None:
        stats = calibrate_recipe(recipe, (cfg, dense, tok), calib_dir)
    mcfg = MoEConfig(len(stats.domains), recipe.top_k, recipe.gate_scaling, recipe.dispatch)
    params, spec = refactor(dense, cfg, stats, recipe.remain_rate, mcfg, recipe.router, recipe.seed)
    rc = ReadMEConfig(cfg.replace(scan_layers=recipe.scan_layers), mcfg, recipe.router)
    meta = {"recipe": recipe.record(tok.name), "stage": "refactor"}
    return Built(models.ReadMEModel(rc, params, spec, meta), stats, tok, cfg)


def write_refactor_report(path: Path, spec: ExpertSpec, stats: ActivationStats, F: int) -> dict:
    """path/refactor.json and path/refactor.md: widths per layer and the active FFN fraction."""
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
