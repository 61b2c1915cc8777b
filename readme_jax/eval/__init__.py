"""Evaluation: perplexity and distillation fidelity, multiple choice, routing analysis, report."""

from readme_jax.eval.domains import domain_stream, evaluate_domains
from readme_jax.eval.multiple_choice import (
    CONTINUATIONS,
    MCResult,
    encode_choices,
    encode_pair,
    lm_eval_prompt,
    score_multiple_choice,
)
from readme_jax.eval.perplexity import (
    FidelityResult,
    PerplexityResult,
    dense_logits_fn,
    fidelity,
    perplexity,
    sliding_windows,
    window_batches,
)
from readme_jax.eval.report import headline_table, render_markdown, write_report
from readme_jax.eval.routing import (
    LayerRedundancy,
    Locality,
    Usage,
    expert_usage,
    layer_redundancy,
    mutual_information,
    normalized_mutual_information,
    pairwise_mutual_information,
    temporal_locality,
)

__all__ = [
    "CONTINUATIONS",
    "FidelityResult",
    "LayerRedundancy",
    "Locality",
    "MCResult",
    "PerplexityResult",
    "Usage",
    "dense_logits_fn",
    "domain_stream",
    "encode_choices",
    "encode_pair",
    "evaluate_domains",
    "expert_usage",
    "fidelity",
    "headline_table",
    "layer_redundancy",
    "lm_eval_prompt",
    "mutual_information",
    "normalized_mutual_information",
    "pairwise_mutual_information",
    "perplexity",
    "render_markdown",
    "score_multiple_choice",
    "sliding_windows",
    "temporal_locality",
    "window_batches",
    "write_report",
]
