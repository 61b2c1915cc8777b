"""Data: default and user text domains, the grain input pipeline, and MMLU tasks."""

from readme_jax.data.corpora import (
    DEFAULT_DOMAINS,
    SPLITS,
    CorpusError,
    SplitConfig,
    load_documents,
    prepare_domain,
    prepare_domains,
)
from readme_jax.data.extract import Document
from readme_jax.data.fetch import FetchError, cache_root
from readme_jax.data.pipeline import (
    BATCH_KEYS,
    PipelineConfig,
    TokenWindows,
    calibration_batch,
    eval_batches,
    load_offsets,
    load_tokens,
    make_dataset,
    make_iterator,
    prepare_tokens,
    token_stats,
)
from readme_jax.data.tasks import MCQuestion, kshot_prompt, load_mmlu

__all__ = [
    "BATCH_KEYS",
    "DEFAULT_DOMAINS",
    "SPLITS",
    "CorpusError",
    "Document",
    "FetchError",
    "MCQuestion",
    "PipelineConfig",
    "SplitConfig",
    "TokenWindows",
    "cache_root",
    "calibration_batch",
    "eval_batches",
    "kshot_prompt",
    "load_documents",
    "load_mmlu",
    "load_offsets",
    "load_tokens",
    "make_dataset",
    "make_iterator",
    "prepare_domain",
    "prepare_domains",
    "prepare_tokens",
    "token_stats",
]
