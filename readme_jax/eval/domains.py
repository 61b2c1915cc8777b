"""Per-domain perplexity, bits per byte and fidelity, in the report's `models[NAME]` layout."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

import readme_jax.data.pipeline as pipeline
from readme_jax.eval.perplexity import LogitsFn, perplexity, perplexity_and_fidelity


def domain_stream(
    domain: str,
    split: str,
    tokenizer: Any,
    *,
    max_tokens: int | None = None,
    cache: str | Path | None = None,
) -> tuple[np.ndarray, int]:
    """(tokens_T, UTF-8 bytes of their text) for a prepared domain split.

    A stream cut to `max_tokens` counts the bytes of its own decoded text (special tokens
    skipped), so bits per byte stays exact for quick runs.
    """
    tokens = pipeline.load_tokens(domain, split, tokenizer, cache)
    if max_tokens is None or len(tokens) <= max_tokens:
        return np.asarray(tokens), int(
            pipeline.token_stats(domain, split, tokenizer, cache)["bytes"]
        )
    cut = np.asarray(tokens[:max_tokens])
    return cut, len(tokenizer.decode(cut.tolist(), skip_special=True).encode("utf-8"))


def evaluate_domains(
    logits_fn: LogitsFn,
    params: Any,
    streams: Mapping[str, tuple[np.ndarray, int | None]],
    *,
    max_length: int,
    stride: int | None = None,
    batch_size: int = 8,
    teacher: tuple[LogitsFn, Any] | None = None,
    progress: bool = True,
) -> dict[str, dict[str, dict[str, Any]]]:
    """{"perplexity": {domain: ...}, "fidelity": {domain: ...}} for one model; `streams` maps
    domain -> (tokens_T, n_bytes or None); fidelity only with a (logits_fn, params) teacher."""
    out: dict[str, dict[str, dict[str, Any]]] = {"perplexity": {}}
    if teacher is not None:
        out["fidelity"] = {}
    win = dict(max_length=max_length, stride=stride, batch_size=batch_size)
    for domain, (tokens_T, n_bytes) in streams.items():
        if teacher is None:
            label = f"ppl {domain}" if progress else False
            r = perplexity(logits_fn, params, tokens_T, n_bytes=n_bytes, progress=label, **win)
        else:  # one pass: the student forward serves both perplexity and KL
            label = f"ppl+KL {domain}" if progress else False
            r, f = perplexity_and_fidelity(
                *teacher, logits_fn, params, tokens_T, n_bytes=n_bytes, progress=label, **win
            )
            out["fidelity"][domain] = f.to_dict()
        out["perplexity"][domain] = r.to_dict()
    return out
