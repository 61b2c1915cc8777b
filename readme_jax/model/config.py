"""Configuration types: the dense decoder (`LlamaConfig`), the MoE FFN (`MoEConfig`), the
pre-gating router (`RouterConfig`) and the Read-ME model that joins them (`ReadMEConfig`).

The dimension glossary, one letter per meaning, used in variable names (`x_BxSxD`) and docstrings
across the project:

  B  batch (rows)                          L  layers
  S  sequence: the new tokens of a call    D  model width
  T  tokens flattened (B * S)              F  FFN width
  M  key / KV-cache length (positions)     E  experts
  A  experts active per token (top-k)      C  expert-cache slots
  N  request slots (serving)               Q  prefill chunk (tokens)
  H  query heads                           K  kv heads (never top-k)
  G  query heads per kv head (H // K)      hd head dim
  V  vocabulary
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

from readme_jax.errors import UserError

SUPPORTED_ARCHITECTURES = ("llama", "LlamaForCausalLM", "MistralForCausalLM")
# MoE expert dispatch implementations (model/moe.py describes each)
DISPATCH_MODES = ("ragged", "blocked", "select")


class ConfigError(UserError, ValueError):
    """A model config that cannot describe a supported checkpoint."""


ROPE_TYPES = ("llama3", "linear", "freq_factors")


@dataclasses.dataclass(frozen=True)
class RopeScaling:
    """RoPE frequency scaling, applied by `model.llama.rope_inv_freq`.

    rope_type "llama3": Llama-3.x smooth scaling (factor, low/high_freq_factor, original context).
    "linear": every inverse frequency divided by `factor` (transformers' linear / llama.cpp's
    `rope.scaling.type = linear`). "freq_factors": inverse frequency i divided by
    `freq_factors[i]` (hd/2 values), as llama.cpp applies a GGUF's `rope_freqs.weight`.
    """

    factor: float = 8.0
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_max_position_embeddings: int = 8192
    rope_type: str = "llama3"
    freq_factors: tuple[float, ...] | None = None

    def __post_init__(self):
        if self.rope_type not in ROPE_TYPES:
            raise ConfigError(f"unknown RoPE scaling {self.rope_type!r}; known: {ROPE_TYPES}")
        if self.freq_factors is not None:
            object.__setattr__(self, "freq_factors", tuple(float(f) for f in self.freq_factors))


@dataclasses.dataclass(frozen=True)
class LlamaConfig:
    vocab_size: int
    dim: int
    n_layers: int
    n_heads: int
    n_kv_heads: int
    ffn_dim: int
    head_dim: int | None = None
    norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    rope_scaling: RopeScaling | None = None
    max_seq_len: int = 2048
    tie_embeddings: bool = False
    dtype: str = "float32"  # parameter dtype: "float32" or "bfloat16"
    scan_layers: bool = False  # lax.scan over stacked layers; unrolled is faster on XLA:CPU
    bos_id: int | None = None
    eos_ids: tuple[int, ...] = ()

    def __post_init__(self):
        if self.head_dim is None:
            if self.dim % self.n_heads:
                raise ConfigError(f"dim={self.dim} is not divisible by n_heads={self.n_heads}")
            object.__setattr__(self, "head_dim", self.dim // self.n_heads)
        if self.n_heads % self.n_kv_heads:
            raise ConfigError(
                f"n_heads={self.n_heads} must be a multiple of n_kv_heads={self.n_kv_heads}"
            )
        if self.dtype not in ("float32", "bfloat16"):
            raise ConfigError(f"dtype must be 'float32' or 'bfloat16', got {self.dtype!r}")

    @property
    def q_per_kv(self) -> int:
        return self.n_heads // self.n_kv_heads

    def replace(self, **kw: Any) -> LlamaConfig:
        return dataclasses.replace(self, **kw)

    def param_count(self) -> int:
        d, f, hd = self.dim, self.ffn_dim, self.head_dim
        attn = d * (self.n_heads + 2 * self.n_kv_heads) * hd + self.n_heads * hd * d
        per_layer = attn + 3 * d * f + 2 * d
        head = 0 if self.tie_embeddings else d * self.vocab_size
        return self.vocab_size * d + self.n_layers * per_layer + d + head

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> LlamaConfig:
        d = dict(d)
        if d.get("rope_scaling") is not None:
            d["rope_scaling"] = RopeScaling(**d["rope_scaling"])
        d["eos_ids"] = tuple(d.get("eos_ids", ()))
        return cls(**d)

    @classmethod
    def from_hf(cls, hf: dict[str, Any] | str | Path, **overrides: Any) -> LlamaConfig:
        """Build from a Hugging Face `config.json` (dict or path)."""
        if not isinstance(hf, dict):
            hf = json.loads(Path(hf).read_text())
        archs = hf.get("architectures") or [hf.get("model_type", "?")]
        if not any(a in SUPPORTED_ARCHITECTURES for a in archs) and hf.get("model_type") not in (
            "llama",
            "mistral",
        ):
            raise ConfigError(
                f"unsupported architecture {archs}; readme_jax loads Llama-family models "
                f"({', '.join(SUPPORTED_ARCHITECTURES)})"
            )
        rs = hf.get("rope_scaling") or (hf.get("rope_parameters") or {})
        scaling, max_len = hf_rope_scaling(rs, hf.get("max_position_embeddings", 2048))
        theta = hf.get("rope_theta", rs.get("rope_theta", 10000.0) if rs else 10000.0)
        eos = hf.get("eos_token_id")
        eos_ids = tuple(eos) if isinstance(eos, list) else ((eos,) if eos is not None else ())
        n_heads = hf["num_attention_heads"]
        kw = dict(
            vocab_size=hf["vocab_size"],
            dim=hf["hidden_size"],
            n_layers=hf["num_hidden_layers"],
            n_heads=n_heads,
            n_kv_heads=hf.get("num_key_value_heads") or n_heads,
            ffn_dim=hf["intermediate_size"],
            head_dim=hf.get("head_dim") or hf["hidden_size"] // n_heads,
            norm_eps=hf.get("rms_norm_eps", 1e-5),
            rope_theta=float(theta),
            rope_scaling=scaling,
            max_seq_len=max_len,
            tie_embeddings=bool(hf.get("tie_word_embeddings", False)),
            bos_id=hf.get("bos_token_id"),
            eos_ids=eos_ids,
        )
        kw.update(overrides)
        return cls(**kw)


def hf_rope_scaling(rs: dict[str, Any], max_len: int) -> tuple[RopeScaling | None, int]:
    """(scaling, usable context) for an HF `rope_scaling` / `rope_parameters` dict.

    Applied as transformers' Llama applies them (modeling_rope_utils): llama3, linear, and
    dynamic (NTK), which equals plain RoPE up to `max_position_embeddings` (transformers only
    rescales past it), so the usable context stays there. Raises ConfigError naming any other
    type (yarn, longrope, ...).
    """
    rope_type = rs.get("rope_type", rs.get("type")) if rs else None
    if rope_type in (None, "default"):
        return None, max_len
    if rope_type == "llama3":
        return RopeScaling(
            factor=float(rs["factor"]),
            low_freq_factor=float(rs["low_freq_factor"]),
            high_freq_factor=float(rs["high_freq_factor"]),
            original_max_position_embeddings=int(rs["original_max_position_embeddings"]),
        ), max_len
    if rope_type == "linear":
        return RopeScaling(factor=float(rs["factor"]), rope_type="linear"), max_len
    if rope_type == "dynamic":
        return None, max_len
    raise ConfigError(
        f"unsupported rope_scaling type {rope_type!r}; readme_jax applies llama3, linear and "
        "dynamic RoPE scaling"
    )


@dataclasses.dataclass(frozen=True)
class MoEConfig:
    """The MoE FFN: E routed experts (A of them per token) beside an always-on shared expert.

    dispatch names the expert kernel (`DISPATCH_MODES`; model/moe.py describes each); layerwise
    selects the baseline with one gate per layer instead of the pre-gating router.
    Raises ValueError for an unknown dispatch or top_k outside [1, num_experts]."""

    num_experts: int
    top_k: int = 1
    gate_scaling: bool = False
    dispatch: str = "ragged"
    layerwise: bool = False  # baseline: a gate per layer instead of the pre-gating router

    def __post_init__(self):
        if self.dispatch not in DISPATCH_MODES:
            raise ValueError(f"dispatch must be one of {DISPATCH_MODES}, got {self.dispatch!r}")
        if not 1 <= self.top_k <= self.num_experts:
            raise ValueError(f"top_k={self.top_k} must be in [1, num_experts={self.num_experts}]")


@dataclasses.dataclass(frozen=True)
class RouterConfig:
    """The pre-gating router: a one-layer causal decoder over token ids (model/router.py)."""

    dim: int = 128  # paper: 512 at Llama-2 scale; scaled down for SmolLM2
    n_heads: int = 4
    ffn_dim: int = 256
    rope_theta: float = 10000.0

    def backbone(self, cfg: LlamaConfig) -> LlamaConfig:
        """The router's one-layer decoder config (vocab and context from the backbone)."""
        return LlamaConfig(
            vocab_size=cfg.vocab_size,
            dim=self.dim,
            n_layers=1,
            n_heads=self.n_heads,
            n_kv_heads=self.n_heads,
            ffn_dim=self.ffn_dim,
            norm_eps=cfg.norm_eps,
            rope_theta=self.rope_theta,
            max_seq_len=cfg.max_seq_len,
            tie_embeddings=True,  # the E-way head replaces the LM head
            dtype=cfg.dtype,
        )


@dataclasses.dataclass(frozen=True)
class ReadMEConfig:
    """A Read-ME model: the MoE backbone (`model`, `moe`) and its pre-gating router."""

    model: LlamaConfig
    moe: MoEConfig
    router: RouterConfig = RouterConfig()

    def to_dict(self) -> dict[str, Any]:
        return {
            "model": self.model.to_dict(),
            "moe": dataclasses.asdict(self.moe),
            "router": dataclasses.asdict(self.router),
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ReadMEConfig:
        return cls(
            LlamaConfig.from_dict(d["model"]), MoEConfig(**d["moe"]), RouterConfig(**d["router"])
        )

    def replace(self, **kw) -> ReadMEConfig:
        return dataclasses.replace(self, **kw)
