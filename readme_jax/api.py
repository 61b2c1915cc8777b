"""The small public API: load a model, tokenize, get logits, generate."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp

from readme_jax.checkpoints.tokenizer import Tokenizer, load_tokenizer
from readme_jax.model import llama
from readme_jax.model.config import LlamaConfig
from readme_jax.model.generate import Generator, dense_model, validate_tokens
from readme_jax.model.sampling import SamplingParams


@dataclasses.dataclass
class LoadedModel:
    cfg: LlamaConfig
    params: Any
    tokenizer: Tokenizer

    def logits(self, token_ids) -> jax.Array:
        """Logits [B, S, V] for equal-length rows of token ids."""
        for i, row in enumerate(token_ids):
            validate_tokens(row, self.cfg.vocab_size, f"row {i}")
        return _forward(self.params, jnp.asarray(token_ids, jnp.int32), self.cfg)

    def generator(self) -> Generator:
        if not hasattr(self, "_gen"):
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


_forward = jax.jit(lambda p, t, cfg: llama.forward(p, t, cfg)[0], static_argnums=2)


def load(path: str | Path | None = None, dtype: str = "float32", **cfg_overrides) -> LoadedModel:
    """Load a dense model: None = bundled SmolLM2 GGUF; a .gguf file; or an HF directory."""
    if path is None or Path(path).suffix == ".gguf":
        from readme_jax.checkpoints.gguf import load_gguf

        cfg, params = load_gguf(path, dtype=dtype, **cfg_overrides)
    else:
        from readme_jax.checkpoints.hf import load_hf

        cfg, params = load_hf(path, dtype=dtype, cfg_overrides=cfg_overrides or None)
    return LoadedModel(cfg, params, load_tokenizer(path))
