"""The small public API: load a model, tokenize, get logits, generate."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp

from readme_jax.checkpoints.kind import GGUF, README, checkpoint_kind
from readme_jax.checkpoints.tokenizer import Tokenizer, load_tokenizer, prompt_ids, with_end_ids
from readme_jax.model.config import LlamaConfig
from readme_jax.model.generate import Generator, dense_logits, dense_model, validate_tokens
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
                from readme_jax.model.readme import decode_model

                self._gen = Generator(decode_model(self.readme), self.params)
            else:
                self._gen = Generator(dense_model(self.cfg), self.params)
        return self._gen

    def generate(
        self,
        prompt: str,
        *,
        chat: bool = False,
        max_new_tokens: int = 64,
        seed: int = 0,
        **sampling,
    ) -> str:
        """Text generated after `prompt` (chat: wrapped in the checkpoint's chat template),
        stopping at any end token the checkpoint declares (cfg.eos_ids). `seed` seeds sampling;
        sampling keywords are SamplingParams fields. Raises TextError / ValueError."""
        ids = prompt_ids(self.tokenizer, prompt, chat)
        sp = SamplingParams(**sampling)
        out = self.generator().generate([ids], max_new_tokens, sp, seed=seed)
        return self.tokenizer.decode(out[0])


def _moe_impl(p, t, rc):
    from readme_jax.model.readme import readme_forward

    return readme_forward(p, t, rc)[0]


_moe_forward = jax.jit(_moe_impl, static_argnums=2)


def load(path: str | Path | None = None, dtype: str = "float32", **cfg_overrides) -> LoadedModel:
    """Load a model: None = bundled SmolLM2 GGUF; a .gguf file; a Hugging Face directory; or a
    readme_jax model directory (a Read-ME MoE written by launch/train.py)."""
    kind = GGUF if path is None else checkpoint_kind(path)
    if kind == README:
        return _load_project(Path(path))
    if kind == GGUF:
        from readme_jax.checkpoints.gguf import load_gguf

        cfg, params = load_gguf(path, dtype=dtype, **cfg_overrides)
    else:
        from readme_jax.checkpoints.hf import load_hf

        cfg, params = load_hf(path, dtype=dtype, cfg_overrides=cfg_overrides or None)
    return LoadedModel(cfg, params, load_tokenizer(path))


def _load_project(path: Path) -> LoadedModel:
    from readme_jax.checkpoints import store

    meta = store.read_meta(path)
    params = store.load_params(path)
    src = meta.get("recipe", {}).get("checkpoint", "")
    tok = load_tokenizer(
        None if src.startswith("bundled:") or not src or src.startswith("random:") else src
    )
    if meta["kind"] == "readme_moe":
        from readme_jax.model.readme import ReadMEConfig

        rc = ReadMEConfig.from_dict(meta["config"])
        rc = rc.replace(model=with_end_ids(rc.model, tok))
        return LoadedModel(rc.model, params, tok, rc)
    cfg = LlamaConfig.from_dict(meta["config"]).replace(scan_layers=False)
    return LoadedModel(with_end_ids(cfg, tok), params, tok)
