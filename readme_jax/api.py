"""The small public API: load a model, tokenize, get logits, generate."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp

from readme_jax.checkpoints import models
from readme_jax.checkpoints.tokenizer import Tokenizer
from readme_jax.decode.generator import Generator, dense_logits
from readme_jax.decode.steps import dense_model, readme_model, validate_tokens
from readme_jax.model.config import LlamaConfig
from readme_jax.model.readme import readme_forward
from readme_jax.model.sampling import SamplingParams


@dataclasses.dataclass
class LoadedModel:
    cfg: LlamaConfig
    params: Any
    tokenizer: Tokenizer
    readme: Any = None  # ReadMEConfig for a Read-ME MoE checkpoint, else None (dense)

    @property
    def is_moe(self) -> bool:
        return self.readme is not None

    def logits(self, token_ids) -> jax.Array:
        """Logits [B, S, V] for equal-length rows of token ids."""
        for i, row in enumerate(token_ids):
            validate_tokens(row, self.cfg.vocab_size, f"row {i}")
        toks = jnp.asarray(token_ids, jnp.int32)
        if self.is_moe:
            return _moe_forward(self.params, toks, self.readme)
        return dense_logits(self.params, toks, self.cfg)

    def generator(self) -> Generator:
        if not hasattr(self, "_gen"):
            if self.is_moe:
                self._gen = Generator(readme_model(self.readme), self.params)
            else:
                self._gen = Generator(dense_model(self.cfg), self.params)
        return self._gen

    def generate(
        self, prompt: str, *, chat: bool = False, max_new_tokens: int = 64, **sampling
    ) -> str:
        if chat:
            prompt = self.tokenizer.apply_chat_template([{"role": "user", "content": prompt}])
        ids = self.tokenizer.encode(prompt)
        out = self.generator().generate([ids], max_new_tokens, SamplingParams(**sampling))
        return self.tokenizer.decode(out[0])


def _moe_impl(p, t, rc):
    return readme_forward(p, t, rc)[0]


_moe_forward = jax.jit(_moe_impl, static_argnums=2)


def load(path: str | Path | None = None, dtype: str = "float32", **cfg_overrides) -> LoadedModel:
    """Load a model: None = bundled SmolLM2 GGUF; a GGUF file; a Hugging Face directory; or a
    readme_jax model directory (a Read-ME MoE written by launch/train.py). What the path holds
    is found by `checkpoints.models.discover`; raises CheckpointError if nothing it knows."""
    kind, cfg, params, tok, _ = models.load_any(path, dtype, **cfg_overrides)
    if kind == "readme_moe":
        return LoadedModel(cfg.model, params, tok, cfg)
    return LoadedModel(cfg, params, tok)
