"""EleutherAI lm-evaluation-harness model "readme_jax": any checkpoint readme_jax loads (the
bundled SmolLM2, a GGUF file, a Hugging Face directory, a Read-ME model directory or a run
directory, whose trained model is taken), scored in this process with JAX.

  python launch/lm_harness.py --model readme_jax --model_args checkpoint=runs/x/moe_trained \
      --tasks readme_cloze,readme_mmlu --batch_size 8

Importing this module registers the model with lm_eval (lm_eval itself never imports
readme_jax; `launch/lm_harness.py` imports this module and then runs lm_eval's own CLI).

Requests are tokenized as lm_eval's `TemplateLM` does (context/continuation split, trailing
spaces moved to the continuation, no BOS unless `add_bos_token`), then scored by the project's
own scorer (`multiple_choice.score_continuations`: rows sorted by length, padded to buckets so
that compiles are reused). `loglikelihood_rolling` cuts a document into lm_eval's disjoint
rolling windows (`lm_eval.utils.get_rolling_token_windows`, prefix = BOS, else EOS) and scores
them the same way. `generate_until` runs the static-batch `Generator` (greedy unless the task
samples) and cuts the text at the task's stop strings.
"""

from __future__ import annotations

import dataclasses
from collections import defaultdict
from pathlib import Path
from typing import Any

import lm_eval.models  # noqa: F401  (the built-in models stay registered next to ours)
from lm_eval.api.model import TemplateLM
from lm_eval.api.registry import register_model
from lm_eval.models.utils import (
    handle_stop_sequences,
    normalize_gen_kwargs,
    postprocess_generated_text,
)
from lm_eval.utils import get_rolling_token_windows, make_disjoint_window

from readme_jax.checkpoints import models
from readme_jax.checkpoints.tokenizer import Tokenizer, with_end_ids
from readme_jax.decode.generator import Generator
from readme_jax.decode.steps import DecodeModel, dense_model, readme_model
from readme_jax.eval.multiple_choice import score_continuations
from readme_jax.eval.perplexity import LogitsFn, dense_logits_fn
from readme_jax.eval.pipeline import readme_logits_fn
from readme_jax.model.config import LlamaConfig, ReadMEConfig
from readme_jax.model.sampling import SamplingParams

DEFAULT_MAX_LENGTH = 2048  # lm_eval's HFLM default when the model declares none smaller


@dataclasses.dataclass(frozen=True)
class ScoringModel:
    """What the harness needs of a model: logits over windows, the same model for decoding,
    its tokenizer and its context (cfg.max_seq_len, tokens)."""

    logits_fn: LogitsFn  # (params, tokens_BxS) -> logits_BxSxV
    params: Any
    decode: DecodeModel
    tokenizer: Tokenizer
    cfg: LlamaConfig

    @classmethod
    def dense(cls, cfg: LlamaConfig, params: Any, tok: Tokenizer) -> ScoringModel:
        cfg = with_end_ids(cfg, tok)
        return cls(dense_logits_fn(cfg), params, dense_model(cfg), tok, cfg)

    @classmethod
    def readme(cls, rc: ReadMEConfig, params: Any, tok: Tokenizer) -> ScoringModel:
        rc = rc.replace(model=with_end_ids(rc.model, tok))
        return cls(readme_logits_fn(rc), params, readme_model(rc), tok, rc.model)


def resolve(checkpoint: str | Path | None) -> str:
    """A run directory (launch/train.py's) names its trained Read-ME, else its first model;
    anything else is returned as given (`checkpoints.models.discover` reads it)."""
    p = Path(checkpoint) if checkpoint else None
    if p is not None and p.is_dir() and not models.exists(p):
        for sub in ("moe_trained", "moe_router", "moe_init"):
            if models.exists(p / sub):
                return str(p / sub)
    return "" if checkpoint is None else str(checkpoint)


def load_scoring_model(checkpoint: str | Path | None, dtype: str = "float32") -> ScoringModel:
    """Any checkpoint `checkpoints.models.discover` knows, or a run directory (`resolve`).
    Raises CheckpointError / ConfigError as the loaders do."""
    kind, cfg, params, tok, _ = models.load_any(resolve(checkpoint), dtype)
    if kind == "readme_moe":
        return ScoringModel.readme(cfg, params, tok)
    return ScoringModel.dense(cfg, params, tok)


def _flag(v: Any) -> bool:
    return v if isinstance(v, bool) else str(v).lower() in ("1", "true", "yes")


@register_model("readme_jax")
class ReadmeLM(TemplateLM):
    """lm_eval's `LM` over a `ScoringModel`. model_args (all optional): checkpoint (path; ""
    is the bundled SmolLM2), dtype, batch_size (rows per forward, B), max_length (tokens per
    row; default min(model context, 2048)), max_gen_toks, pad_multiple (row length bucket),
    add_bos_token, seed (sampling tasks). `model=` takes an already built ScoringModel."""

    def __init__(
        self,
        checkpoint: str | None = None,
        *,
        model: ScoringModel | None = None,
        dtype: str = "float32",
        batch_size: int | str = 8,
        max_length: int | None = None,
        max_gen_toks: int = 256,
        pad_multiple: int = 64,
        add_bos_token: bool | str = False,
        seed: int = 0,
        **unused: Any,  # lm_eval's device / max_batch_size: JAX picks its own device
    ) -> None:
        super().__init__()
        self.m = model if model is not None else load_scoring_model(checkpoint, dtype)
        self.tok = self.m.tokenizer
        bs = str(batch_size)
        self.batch_size = 8 if bs.startswith("auto") else int(bs)
        limit = min(self.m.cfg.max_seq_len, DEFAULT_MAX_LENGTH)
        self.max_length = int(max_length) if max_length else limit
        self.max_gen_toks = int(max_gen_toks)
        self.pad_multiple = int(pad_multiple)
        self.add_bos_token = _flag(add_bos_token)
        self.seed = int(seed)
        self._generator: Generator | None = None

    # ------------------------------------------------------------------ tokens
    @property
    def eot_token_id(self) -> int:
        return self.tok.eos_id

    @property
    def prefix_token_id(self) -> int:
        return self.tok.bos_id if self.tok.bos_id is not None else self.tok.eos_id

    def tok_encode(self, string: str, add_special_tokens: bool | None = None, **kw) -> list[int]:
        bos = self.add_bos_token if add_special_tokens is None else add_special_tokens
        return self.tok.encode(string, add_bos=bool(bos))

    def tok_decode(self, ids: list[int]) -> str:
        return self.tok.decode(ids)

    # ------------------------------------------------------------------ scoring
    def _score(self, pairs: list[tuple[list[int], list[int]]], disable_tqdm: bool):
        lp, greedy = score_continuations(
            self.m.logits_fn,
            self.m.params,
            pairs,
            batch_size=self.batch_size,
            max_len=self.max_length,
            pad_multiple=self.pad_multiple,
            progress=False if disable_tqdm else "readme_jax loglikelihood",
        )
        return [(float(a), bool(g)) for a, g in zip(lp, greedy, strict=True)]

    def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, **kw):
        """requests: ((context, continuation), context ids, continuation ids) as TemplateLM
        builds them -> [(log-likelihood in nats, is greedy)]."""
        out = self._score([(ctx, cont) for _, ctx, cont in requests], disable_tqdm)
        for (key, _, _), res in zip(requests, out, strict=True):
            self.cache_hook.add_partial("loglikelihood", key, res)
        return out

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        pairs, owner = [], []
        for i, req in enumerate(requests):
            windows = get_rolling_token_windows(
                self.tok_encode(req.args[0]), self.prefix_token_id, self.max_length, 1
            )
            for ctx, cont in map(make_disjoint_window, windows):
                pairs.append((ctx, cont))
                owner.append(i)
        total = [0.0] * len(requests)
        if pairs:
            for i, (lp, _) in zip(owner, self._score(pairs, disable_tqdm), strict=True):
                total[i] += lp
        for req, t in zip(requests, total, strict=True):
            self.cache_hook.add_partial("loglikelihood_rolling", req.args, t)
        return total

    # ------------------------------------------------------------------ generation
    def generator(self) -> Generator:
        if self._generator is None:
            self._generator = Generator(self.m.decode, self.m.params)
        return self._generator

    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        """Requests with equal generation arguments run together, `batch_size` prompts at a
        time (the last batch padded with repeats so that it reuses the compile)."""
        groups: dict[str, list[int]] = defaultdict(list)
        for i, req in enumerate(requests):
            groups[repr(sorted(req.args[1].items()))].append(i)
        out: list[str] = [""] * len(requests)
        eos = self.tok.decode([self.eot_token_id]) if self.eot_token_id is not None else None
        for idx in groups.values():
            kw = normalize_gen_kwargs(requests[idx[0]].args[1], self.max_gen_toks)
            until = handle_stop_sequences(kw.get("until"), eos)
            n_new = min(kw["max_gen_toks"], self.m.cfg.max_seq_len - 1)
            sp = SamplingParams(temperature=float(kw.get("temperature", 0.0) or 0.0))
            keep = self.m.cfg.max_seq_len - n_new
            idx = sorted(idx, key=lambda i: -len(requests[i].args[0]))
            for s in range(0, len(idx), self.batch_size):
                chunk = idx[s : s + self.batch_size]
                prompts = [self.tok_encode(requests[i].args[0])[-keep:] for i in chunk]
                prompts += [prompts[0]] * (self.batch_size - len(prompts))
                toks = self.generator().generate(prompts, n_new, sp, seed=self.seed)
                for i, t in zip(chunk, toks, strict=False):
                    text = postprocess_generated_text(self.tok.decode(t), until, None)
                    out[i] = text
                    self.cache_hook.add_partial("generate_until", requests[i].args, text)
        return out

    # ------------------------------------------------------------------ chat templates
    @property
    def tokenizer_name(self) -> str:
        return self.tok.name

    def chat_template(self, chat_template: bool | str = False) -> str | None:
        return self.tok.chat_template if chat_template else None

    def apply_chat_template(self, chat_history, add_generation_prompt: bool = True) -> str:
        return self.tok.apply_chat_template(chat_history, add_generation_prompt)
