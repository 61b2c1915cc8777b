"""The dense -> Read-ME pipeline, wired once: calibrate (cached) -> experts -> MoE parameters.

  recipe = Recipe(checkpoint="", domains="fiction,drama,code_docs,manual", remain_rate=0.5)
  built = build_readme(recipe, calib_dir="runs/x/calib")   # Built(model, stats, tokenizer)
  built.save("runs/x/moe_init")   # model.json records recipe.describe()

`launch/train.py` (the calibrate and refactor stages), serving's on-the-fly build and the
benchmarks all call `build_readme`, which runs the whole recipe (construction, refit, layer-local
phase, the static control): the trained and the on-the-fly builds of one config are the same
model before training. Construction and refit run in one pass over the layers, into the final
arrays (`layerwise.refactor_per_layer`). Each step is also a function of its own
(`calibration_batches`, `calibrate`, `static_control`) for tests and tools. Statistics are cached in
`calib_dir` and reused when the recorded recipe matches (`ActivationStats.recipe`).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from pathlib import Path
from typing import Any

import jax.numpy as jnp
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
from readme_jax.model.spec import ExpertSpec
from readme_jax.refactor import reconstruct
from readme_jax.refactor.cluster import chunk_assign, cluster_assign, router_assign
from readme_jax.refactor.construct import (
    Construction,
    prefix_groups,
    static_channels,
    static_pruned,
)
from readme_jax.refactor.experts import active_ffn_fraction
from readme_jax.refactor.layerwise import refactor_per_layer
from readme_jax.refactor.local_distill import LocalDistillConfig
from readme_jax.refactor.local_distill import at_refactor as local_distill_at_refactor
from readme_jax.refactor.reconstruct import ReconstructConfig
from readme_jax.refactor.stats import ActivationStats, collect_stats, group_stats

# the defaults of configs/smollm2_135m.py (tests/project/test_served.py checks they agree), so
# that the on-the-fly build (readme_jax/served.py) is the default config's recipe
DEFAULT_DOMAINS = "fiction,drama,code_docs,manual,chat"
# Recipe field -> the run config key that sets it (configs/smollm2_135m.py), for messages
RUN_CONFIG_KEYS = {
    "remain_rate": "refactor.remain_rate",
    "num_sequences": "calib.num_sequences",
    "seq_len": "calib.seq_len",
    "clusters": "refactor.num_clusters",
    "cluster_chunk": "refactor.cluster_chunk",
    "cluster_router": "refactor.cluster_router",
    "top_k": "moe.top_k",
    "dispatch": "moe.dispatch",
    "dtype": "model.dtype",
    "construction.score": "refactor.score",
    "construction.shared": "refactor.shared",
    "construction.experts": "refactor.experts",
    "construction.shared_frac": "refactor.shared_frac",
}
STATIC_CONTROL_FILE = "static_control.npz"


@dataclasses.dataclass(frozen=True)
class Recipe:
    """Everything that determines a refactored (untrained) Read-ME model.

    checkpoint: the dense source (`checkpoints.models.discover`; "" = bundled SmolLM2).
    domains: "name[=path],..." (>= 2; one expert each unless `clusters` > 0).
    num_sequences, seq_len, split: calibration text per domain (sequences x tokens).
    clusters: 0 = one expert per domain; k > 0 = k experts from k-means clusters of pooled
    token activations (`refactor/cluster.py`); cluster_chunk > 0 clusters contexts of that
    many tokens instead of tokens (`cluster.chunk_assign`); cluster_router = a Read-ME model
    directory: the groups are the tokens its trained router sends to each expert
    (`cluster.router_assign`; `clusters` = its number of experts), the experts are refit on those
    groups and the model starts from that router: experts built around a partition the router
    reaches.
    construction: which channels the shared core and each expert keep (refactor/construct.py).
    refit: the least-squares refit of the kept channels' down rows (refactor/reconstruct.py);
    local: layer-local distillation after it (refactor/local_distill.py; 0 steps = off).
    static_control: also build the static-pruning control of the same rule and refit
    (`Built.static`; the trainer's static baseline).
    layers_on_disk: a Hugging Face checkpoint's decoder layers are read one at a time from its
    files (`models.load_dense`), so the conversion holds one layer of the dense model, not all
    of them; domain experts only (clustering, the layer-local phase and the static control read
    the whole model). It does not change the model built.
    """

    checkpoint: str = ""
    domains: str = DEFAULT_DOMAINS
    num_sequences: int = 16
    seq_len: int = 512
    split: str = "train"
    seed: int = 0
    remain_rate: float = 0.5
    clusters: int = 0
    cluster_chunk: int = 0
    cluster_router: str = ""
    dtype: str = "float32"
    scan_layers: bool = False
    layers_on_disk: bool = False
    data_cache: str | None = None
    top_k: int = 1
    gate_scaling: bool = False
    dispatch: str = "ragged"
    router: RouterConfig = dataclasses.field(default_factory=RouterConfig)
    # the default run config's (configs/smollm2_135m.py): the OBS score with the paper's rule
    construction: Construction = dataclasses.field(default_factory=lambda: Construction("obs"))
    refit: ReconstructConfig = dataclasses.field(
        default_factory=lambda: ReconstructConfig(calib_sequences=8)
    )
    local: LocalDistillConfig = dataclasses.field(default_factory=LocalDistillConfig)
    static_control: bool = False

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
            ("cluster_chunk", self.cluster_chunk >= 0, ">= 0 (0 = cluster tokens)"),
            ("top_k", self.top_k >= 1, ">= 1"),
            ("dispatch", self.dispatch in DISPATCH_MODES, f"one of {list(DISPATCH_MODES)}"),
            ("dtype", self.dtype in ("float32", "bfloat16"), "float32 or bfloat16"),
            ("router.dim", F.dim >= 1 and F.dim % max(F.n_heads, 1) == 0, "a multiple of n_heads"),
            ("router.n_heads", F.n_heads >= 1, ">= 1"),
            ("router.ffn_dim", F.ffn_dim >= 1, ">= 1"),
            ("construction.shared_frac", 0 <= self.construction.shared_frac <= 1, "[0, 1]"),
        ]
        for field, ok, allowed in rules:
            if not ok:
                key = keys.get(field, field)
                node, _, leaf = field.rpartition(".")
                value = getattr(getattr(self, node) if node else self, leaf)
                raise ConfigError(f"{key}={value!r} is out of range: allowed {allowed}")
        self.construction.check()
        if self.cluster_router and not self.clusters:
            raise ConfigError(
                f"{keys.get('cluster_router', 'cluster_router')}={self.cluster_router!r} groups "
                "tokens by a router: it needs clustered experts (refactor.clustering=True)"
            )
        if self.cluster_router and self.cluster_chunk:
            raise ConfigError("cluster_router and cluster_chunk exclude each other: choose one")
        whole = {"refactor.clustering": self.clusters, "refactor.local_steps": self.local.steps,
                 "train.baselines=static": self.static_control}  # fmt: skip
        needs = [k for k, v in whole.items() if v]
        if self.layers_on_disk and needs:
            raise ConfigError(
                f"model.layers_on_disk=True converts one layer at a time, but {', '.join(needs)} "
                "reads the whole dense model: turn those off or set model.layers_on_disk=False"
            )
        if self.local.steps > 0 and self.clusters:
            raise ConfigError(
                "refactor.local_steps > 0 needs one expert per domain, but refactor.clustering "
                "builds k-means clusters; set refactor.local_steps=0"
            )
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
            cluster_chunk=c.refactor.get("cluster_chunk", 0) if k else 0,
            cluster_router=c.refactor.get("cluster_router", "") if k else "",
            dtype=c.model.dtype,
            scan_layers=c.model.scan_layers,
            layers_on_disk=bool(c.model.get("layers_on_disk", False)),
            data_cache=c.data.cache or None,
            top_k=c.moe.top_k,
            gate_scaling=c.moe.gate_scaling,
            dispatch=c.moe.dispatch,
            router=RouterConfig(c.router.dim, c.router.n_heads, c.router.ffn_dim),
            construction=Construction(
                c.refactor.get("score", "magnitude"),
                c.refactor.get("shared", "intersection"),
                c.refactor.get("experts", "overlap"),
                c.refactor.get("shared_frac", 0.5),
            ),
            refit=ReconstructConfig.from_config(c.refactor),
            local=LocalDistillConfig.from_config(c.refactor),
            static_control=_trains_static(c),
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
        if self.clusters and self.cluster_chunk:
            rec["cluster_chunk"] = self.cluster_chunk
        if self.clusters and self.cluster_router:
            rec["cluster_router"] = self.cluster_router
        return rec | ({"clusters": self.clusters} if self.clusters else {})

    def describe(self, tokenizer_name: str) -> dict[str, Any]:
        """The whole recipe as the model's `model.json` records it ("recipe"): the statistics'
        record plus every choice that shapes the experts. The trained build and the on-the-fly
        build of one config describe themselves identically."""
        return self.record(tokenizer_name) | {
            "remain_rate": self.remain_rate,
            "top_k": self.top_k,
            "construction": dataclasses.asdict(self.construction),
            "refit": dataclasses.asdict(self.refit),
            "local_distill": dataclasses.asdict(self.local),
        }


def _trains_static(c: Any) -> bool:
    """Whether a run config's train stage trains the static baseline (it then needs the control)."""
    b = c.train.baselines if c.train.baselines is not None else c.train.presets[c.preset].baselines
    return "static" in str(b).split(",")


@dataclasses.dataclass
class StaticControl:
    """Static pruning by the recipe's rule: the dense model keeping kept_LxK channels of every
    FFN, with refit down rows [L, K, D] when the recipe refits (else None)."""

    kept_LxK: np.ndarray
    w_down_LxKxD: np.ndarray | None

    def save(self, path: str | Path) -> None:
        extra = {} if self.w_down_LxKxD is None else {"w_down": self.w_down_LxKxD}
        np.savez(Path(path) / STATIC_CONTROL_FILE, kept=self.kept_LxK, **extra)

    @classmethod
    def load(cls, path: str | Path) -> StaticControl | None:
        """From a model directory; None when it holds no control (built without one)."""
        f = Path(path) / STATIC_CONTROL_FILE
        if not f.exists():
            return None
        z = np.load(f)
        return cls(z["kept"], z["w_down"] if "w_down" in z else None)

    def params(self, dense: Any) -> tuple[Any, int]:
        """(the pruned dense params, its FFN width K); use with cfg.replace(ffn_dim=K)."""
        p = static_pruned(llama.stack_layers(dense), self.kept_LxK)
        if self.w_down_LxKxD is not None:
            w = p["layers"]["w_down"]
            p = {**p, "layers": {**p["layers"], "w_down": jnp.asarray(self.w_down_LxKxD, w.dtype)}}
        return p, int(self.kept_LxK.shape[1])


@dataclasses.dataclass
class Built:
    model: models.ReadMEModel  # meta = {"recipe": Recipe.describe(), "stage": "refactor"}
    stats: ActivationStats
    tokenizer: Tokenizer
    dense_cfg: LlamaConfig
    static: StaticControl | None = None

    def save(self, moe_dir: str | Path) -> None:
        """The static control, then the Read-ME model (checkpoints.models.save_readme, whose
        model.json comes last: a directory that `models.exists` holds both)."""
        if self.static is not None:
            Path(moe_dir).mkdir(parents=True, exist_ok=True)
            self.static.save(moe_dir)
        m = self.model
        models.save_readme(moe_dir, m.params, m.rc, m.spec, m.meta)


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
    obs_ridge: float | None = None,
) -> ActivationStats:
    """Per-domain activation statistics (mean |h|, activation rate, and with `obs_ridge` the
    OBS score); reuses out_dir/stats.json if its recipe matches and it has the scores asked."""
    if out_dir is not None and (Path(out_dir) / "stats.json").exists():
        st = ActivationStats.load(out_dir)
        if st.recipe == recipe and st.has("frequency") and (obs_ridge is None or st.has("obs")):
            return st
    st = collect_stats(params, cfg, domain_batches, recipe, obs_ridge)
    if out_dir is not None:
        st.save(out_dir)
    return st


def cache_dir(recipe: Recipe, tokenizer_name: str, root: str | Path) -> Path:
    """root/calib-<hash of the recipe record>: a statistics cache shared by identical recipes."""
    rec = json.dumps(recipe.record(tokenizer_name), sort_keys=True)
    return Path(root) / f"calib-{hashlib.sha256(rec.encode()).hexdigest()[:12]}"


def calibrate_recipe(
    recipe: Recipe,
    source: tuple[LlamaConfig, Any, Tokenizer],
    calib_dir: str | Path | None = None,
    router_model: models.ReadMEModel | None = None,
) -> ActivationStats:
    """Statistics of `source` = (cfg, params, tokenizer) on the recipe's calibration text: per
    domain, or per k-means cluster of the pooled tokens (recipe.clusters), or per group of
    recipe.cluster_router's router (`router_model` if already loaded)."""
    cfg, dense, tok = source
    rec = recipe.record(tok.name)
    batches = recipe.batches(tok)
    obs = recipe.refit.ridge if recipe.construction.score == "obs" else None
    if not recipe.clusters:
        return calibrate(cfg, dense, batches, rec, calib_dir, obs)
    if calib_dir is not None and (Path(calib_dir) / "stats.json").exists():
        st = ActivationStats.load(calib_dir)
        saved = {k: v for k, v in st.recipe.items() if k != "clustering"}
        if saved == rec and st.has("frequency") and (obs is None or st.has("obs")):
            return st
    pooled = [b for bs in batches.values() for b in bs]
    if recipe.cluster_router:
        groups = _router_groups(router_model or _cluster_router(recipe, cfg), cfg, pooled)
    elif recipe.cluster_chunk:
        groups = chunk_assign(
            dense, cfg, pooled, recipe.clusters, recipe.cluster_chunk, seed=recipe.seed
        )
    else:
        groups = cluster_assign(dense, cfg, pooled, recipe.clusters, seed=recipe.seed)
    g = group_stats(
        dense, cfg, pooled, groups, recipe.clusters, desc="calibrate clusters", obs_ridge=obs
    )
    sizes = g.n_tokens.astype(int).tolist()
    method = {"method": "spherical k-means", "proj_per_layer": 8, "seed": recipe.seed}
    if recipe.cluster_router:
        method = {"method": "router top-1", "router": recipe.cluster_router}
    names = [f"cluster{j}" for j in range(recipe.clusters)]
    st = ActivationStats.of(names, g, {**rec, "clustering": {**method, "sizes": sizes}})
    if calib_dir is not None:
        st.save(calib_dir)
    return st


def static_control(
    recipe: Recipe,
    source: tuple[LlamaConfig, Any, Tokenizer],
    stats: ActivationStats,
    spec: ExpertSpec,
    batches: dict[str, list[np.ndarray]] | None = None,
) -> StaticControl:
    """Static pruning at the Read-ME model's active FFN width (shared + top_k average experts)
    by the same channel score as its construction (the pooled score over all calibration
    tokens: `construct.static_channels`), with the same refit."""
    cfg, dense, tok = source
    F = cfg.ffn_dim
    width = int(round(active_ffn_fraction(spec, F, recipe.top_k) * F))
    score = recipe.construction.score
    if stats.rate_ExLxF is None:  # statistics from before the rate: the domain-averaged rule
        kept = reconstruct.static_kept(stats.mean_abs_ExLxF, width / F)
    else:
        kept = static_channels(stats.groups(), score, width)
    w = None
    if recipe.refit.mode != "none":
        sub = reconstruct.refit_subset(batches or recipe.batches(tok), recipe.refit.calib_sequences)
        w = reconstruct.reconstruct_static(dense, cfg, kept, sub, recipe.refit.ridge)
    return StaticControl(kept, w)


def _cluster_router(recipe: Recipe, cfg: LlamaConfig) -> models.ReadMEModel:
    """The Read-ME model whose router groups the tokens (recipe.cluster_router), checked."""
    rm = models.load_readme(recipe.cluster_router)
    if rm.rc.router != recipe.router:
        raise ConfigError(
            f"refactor.cluster_router={recipe.cluster_router!r} has a router of {rm.rc.router}; "
            f"the recipe's is {recipe.router}: set router.* to match"
        )
    if rm.rc.moe.num_experts != recipe.clusters or rm.rc.model.vocab_size != cfg.vocab_size:
        raise ConfigError(
            f"refactor.cluster_router={recipe.cluster_router!r} routes over "
            f"{rm.rc.moe.num_experts} experts and {rm.rc.model.vocab_size} token ids; the recipe "
            f"asks for {recipe.clusters} clusters of a {cfg.vocab_size}-token model: set "
            f"refactor.num_clusters={rm.rc.moe.num_experts} or use a router of this model"
        )
    return rm


def _router_groups(rm: models.ReadMEModel, cfg: LlamaConfig, batches: list[np.ndarray]):
    return router_assign(rm.params["router"], rm.rc.router, cfg, batches)


def _refit_groups(recipe: Recipe, dense: Any, cfg: LlamaConfig, rm: models.ReadMEModel | None):
    """The refit's token groups for experts not grouped by domain or by Eq. 4's token oracle
    (`layerwise.refactor_per_layer`'s default): context clusters by their causal-prefix oracle
    (`construct.prefix_groups`, the target train.target_prefix trains the router towards), router
    clusters by the choice of `rm`'s router (`cluster.router_assign`); None otherwise."""
    if rm is not None:
        return lambda spec, rows: _router_groups(rm, cfg, rows)
    if recipe.cluster_chunk:
        return lambda spec, rows: prefix_groups(dense, cfg, spec, rows, 0.5)
    return None


def load_source(recipe: Recipe) -> tuple[LlamaConfig, Any, Tokenizer]:
    """(cfg, dense params, tokenizer) of the recipe's checkpoint (`models.load_dense`; with
    recipe.layers_on_disk the decoder layers stay in the checkpoint's files)."""
    return models.load_dense(
        recipe.checkpoint, recipe.dtype, recipe.scan_layers, recipe.seed, recipe.layers_on_disk
    )


def build_readme(
    recipe: Recipe,
    calib_dir: str | Path | None = None,
    *,
    calib_root: str | Path | None = None,
    source: tuple[LlamaConfig, Any, Tokenizer] | None = None,
    stats: ActivationStats | None = None,
) -> Built:
    """The untrained Read-ME model of `recipe`, whole: load the dense source (unless `source`
    is given), calibrate (cached in `calib_dir`, or in `calib_root`/calib-<recipe hash>; or use
    `stats`), build the experts by the recipe's construction, refit them, run the layer-local
    phase if any, and (recipe.static_control) the static control of the same rule. Raises
    ConfigError (`Recipe.check`) before loading."""
    recipe.check()
    source = source or load_source(recipe)
    cfg, dense, tok = source
    if calib_dir is None and calib_root is not None:
        calib_dir = cache_dir(recipe, tok.name, calib_root)
    rm = _cluster_router(recipe, cfg) if recipe.cluster_router else None  # loaded once
    if stats is None:
        stats = calibrate_recipe(recipe, source, calib_dir, rm)
    mcfg = MoEConfig(len(stats.domains), recipe.top_k, recipe.gate_scaling, recipe.dispatch)
    needs_batches = recipe.refit.mode != "none" or recipe.local.steps > 0
    batches = recipe.batches(tok) if needs_batches else None
    params, spec = refactor_per_layer(
        dense,
        cfg,
        stats,
        recipe.remain_rate,
        recipe.router,
        recipe.refit,
        batches,
        recipe.seed,
        recipe.construction,
        groups=_refit_groups(recipe, dense, cfg, rm),
    )
    if rm is not None:  # start from the router the experts were built around
        params = {**params, "router": rm.params["router"]}
    if recipe.local.steps > 0:
        params = local_distill_at_refactor(recipe.local, dense, cfg, params, spec.domains, batches)
    control = (
        static_control(recipe, source, stats, spec, batches) if recipe.static_control else None
    )
    rc = ReadMEConfig(cfg.replace(scan_layers=recipe.scan_layers), mcfg, recipe.router)
    meta = {
        "recipe": recipe.describe(tok.name),
        "stage": "refactor",
        "reconstruct": dataclasses.asdict(recipe.refit),  # read by older tools and the trainer
        "local_distill": dataclasses.asdict(recipe.local),
    }
    return Built(models.ReadMEModel(rc, params, spec, meta), stats, tok, cfg, control)
