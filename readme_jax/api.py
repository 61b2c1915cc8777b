"""The small public API: load a model, tokenize, get logits, generate."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp

from readme_jax.checkpoints import models
from readme_jax.checkpoints.tokenizer import Tokenizer, prompt_ids, with_end_ids
from readme_jax.decode.generator import Generator, dense_logits
from readme_jax.decode.steps import check_layout, dense_model, readme_model, validate_tokens
from readme_jax.model import quant as quant_lib
from readme_jax.model.config import LlamaConfig
from readme_jax.model.readme import readme_forward
from readme_jax.model.sampling import SamplingParams


@dataclasses.dataclass
class LoadedModel:
    cfg: LlamaConfig
    params: Any
    tokenizer: Tokenizer
    readme: Any = None  # ReadMEConfig for a Read-ME MoE checkpoint, else None (dense)
    quant: str = "none"  # the matmul weights' form when generating (model/quant.py)
    layout: str = "trimmed"  # the decode layout when generating (decode/steps.py LAYOUTS)

    @property
    def is_moe(self) -> bool:
        return self.readme is not None

    def logits(self, token_ids) -> jax.Array:
        """Logits [B, S, V] for equal-length rows of token ids."""
        for i, row in enumerate(token_ids):
            validate_tokens(row, self.cfg.vocab_size, f"row {i}")
        toks = jnp.asarray(token_ids, jnp.int32)
        if self.quant != "none":  # the generator's low-bit weights, through its step
            gen = self.generator()
            return _step_logits(gen.params, toks, gen.model)
        if self.is_moe:
            return _moe_forward(self.params, toks, self.readme)
        return dense_logits(self.params, toks, self.cfg)

    def generator(self) -> Generator:
        if not hasattr(self, "_gen"):
            if self.is_moe:
                model = readme_model(self.readme, self.quant, self.layout)
            else:  # the dense stacked layout is the scan over the stored layers
                cfg = self.cfg.replace(scan_layers=self.layout == "stacked")
                model = dense_model(cfg, self.quant)
            self._gen = Generator(model, self.params)
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
    return readme_forward(p, t, rc)[0]


_moe_forward = jax.jit(_moe_impl, static_argnums=2)


def _step_impl(params, toks_BxS, model):
    B, S = toks_BxS.shape
    return model.step(params, toks_BxS, model.new_cache(B, S), None)[0]


_step_logits = jax.jit(_step_impl, static_argnums=2)


def load(
    path: str | Path | None = None,
    dtype: str = "float32",
    quant: str | None = None,
    layout: str = "trimmed",
    **cfg_overrides,
) -> LoadedModel:
    """Load a model: None = bundled SmolLM2 GGUF; a GGUF file; a Hugging Face directory; or a
    readme_jax model directory (a Read-ME MoE written by launch/train.py). What the path holds
    is found by `checkpoints.models.discover`; raises CheckpointError if nothing it knows.

    quant: the matmul weights' form for generating and logits, one of model/quant.py's
    QUANT_MODES ("int8", "bf16", ...); None takes the one saved in the model's model.json
    ("quant", see `models.saved_quant`), else "none". Raises ConfigError for an unknown one.

    layout: how the generator holds the weights (decode/steps.py `readme_model`): "trimmed"
    (per-layer arrays, Read-ME's experts trimmed and fused: the fastest step, a second copy of
    the weights beside the loaded ones) or "stacked" (the loaded arrays, the layers as a scan:
    the weights once, for a model that fills the host). Raises ConfigError for another."""
    check_layout(layout)
    kind, cfg, params, tok, meta = models.load_any(path, dtype, **cfg_overrides)
    q = quant_lib.check_mode(models.saved_quant(meta) if quant is None else quant)
    if kind == "readme_moe":  # end ids of the source tokenizer (older saves kept one)
        cfg = cfg.replace(model=with_end_ids(cfg.model, tok))
        return LoadedModel(cfg.model, params, tok, cfg, q, layout)
    return LoadedModel(with_end_ids(cfg, tok), params, tok, quant=q, layout=layout)
