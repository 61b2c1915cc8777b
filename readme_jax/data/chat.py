"""The `chat` domain: conversations sampled from the teacher itself, in its own chat template.

A converted model is used through the chat template, and distilling only on plain text loses
what the Instruct teacher does there (it learns to end its turn at once). This domain gives the
distillation, the calibration statistics and the evaluation text in that format, written by the
teacher (data-free distillation, LLM-QAT, Liu et al. 2023; on-policy teacher text, GKD /
MiniLLM):

1. **User turns** are sampled from the teacher given only the template's prefix up to the user
   turn ("Magpie", Xu et al. 2024, arXiv 2406.08464: an aligned model prompted with its
   pre-query template writes queries like those of its instruction data). Temperature
   `query_temperature`, nucleus `query_top_p`; a query that does not end within
   `query_max_tokens`, is empty, or repeats an earlier one is dropped.
2. **Assistant turns**: the first `greedy_tokens` answer tokens greedy, the rest sampled at
   `answer_temperature` / `answer_top_p` (LLM-QAT's recipe: a few deterministic tokens, then
   sampling, so that the text is the teacher's likely answers yet varied). An answer cut at
   `answer_max_tokens` is kept (the model saw the same prefix).
3. Each conversation is rendered with the template (no generation prompt) and written as one
   document of the prepared domain (train / validation / test by document hash, as every
   domain), so it goes through the same tokenizer cache and grain pipeline as the text domains.
   A trailing end-of-turn that equals the tokenizer's EOS is left to the pipeline's EOS.

The sampling itself is injected (`SampleFn`): this module imports no model code
(`launch/data.py` passes the teacher's batched generator). Deterministic for a seed: the
batches, their order and every sampling key follow from `ChatConfig.seed`.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, Protocol

import readme_jax.data.corpora as corpora
import readme_jax.data.fetch as fetch
from readme_jax.data.extract import Document

CHAT_DOMAIN = "chat"
GENERATOR_VERSION = 1

# (prompts [B] of token ids, max_new_tokens, temperature, top_p, seed) -> new ids per prompt,
# each stopped at (and without) the first end-of-generation token; `ended[b]` says whether
# row b stopped at one (else it ran out of tokens).
SampleFn = Callable[
    [Sequence[Sequence[int]], int, float, float, int], tuple[list[list[int]], list[bool]]
]


class ChatTokenizer(Protocol):
    """What the chat domain needs of a tokenizer (checkpoints.tokenizer.Tokenizer has it)."""

    name: str
    special_tokens: dict[str, str]

    def encode(self, text: str, add_bos: bool | None = None) -> list[int]: ...
    def decode(self, ids: Sequence[int], skip_special: bool = False) -> str: ...
    def apply_chat_template(self, messages: list[dict[str, str]], add_generation_prompt=True): ...
    def encode_chat(self, messages: list[dict[str, str]], add_generation_prompt=True): ...


@dataclasses.dataclass(frozen=True)
class ChatConfig:
    """How many conversations, and how they are sampled (defaults: see the module docstring).

    conversations: sampled in all (before the drop of empty / repeated queries); split
      `validation` / `test` fractions by document hash like every domain.
    batch_size: prompts per generator call (one compile per batch shape).
    """

    conversations: int = 192
    seed: int = 0
    batch_size: int = 48
    query_max_tokens: int = 64
    query_temperature: float = 1.0
    query_top_p: float = 1.0
    answer_max_tokens: int = 128
    greedy_tokens: int = 4
    answer_temperature: float = 0.7
    answer_top_p: float = 0.9
    validation: float = 0.15
    test: float = 0.15

    def __post_init__(self):
        rules = [
            ("conversations", self.conversations >= 3, ">= 3 (one per split)"),
            ("batch_size", self.batch_size >= 1, ">= 1"),
            ("query_max_tokens", self.query_max_tokens >= 1, ">= 1"),
            ("answer_max_tokens", self.answer_max_tokens >= 1, ">= 1"),
            (
                "greedy_tokens",
                0 <= self.greedy_tokens <= self.answer_max_tokens,
                f"[0, answer_max_tokens={self.answer_max_tokens}]",
            ),
            ("query_top_p", 0 < self.query_top_p <= 1, "(0, 1]"),
            ("answer_top_p", 0 < self.answer_top_p <= 1, "(0, 1]"),
            ("query_temperature", self.query_temperature >= 0, ">= 0"),
            ("answer_temperature", self.answer_temperature >= 0, ">= 0"),
        ]
        for key, ok, allowed in rules:
            if not ok:
                raise corpora.CorpusError(
                    f"chat.{key}={getattr(self, key)} is out of range: allowed {allowed}"
                )

    @classmethod
    def from_config(cls, c: Any) -> ChatConfig:
        """From an ml_collections block with (some of) these field names."""
        return cls(**{f.name: c[f.name] for f in dataclasses.fields(cls) if f.name in c})


def query_prefix(tokenizer: ChatTokenizer) -> list[int]:
    """Token ids of the chat template up to where the user's words begin (Magpie's pre-query
    template): the default system turn, then the user header. Raises CorpusError when the
    template does not place the user's text verbatim."""
    marker = "\x00QUERY\x00"
    text = tokenizer.apply_chat_template(
        [{"role": "user", "content": marker}], add_generation_prompt=False
    )
    if marker not in text:
        raise corpora.CorpusError(
            f"the chat template of {tokenizer.name} does not write the user's text verbatim; "
            "the chat domain cannot find where a user turn starts"
        )
    head = text[: text.index(marker)]
    bos = tokenizer.special_tokens.get("bos_token")
    if bos and head.startswith(bos):  # the template writes the one BOS (as encode_chat keeps it)
        return list(tokenizer.encode(head, add_bos=False))
    return list(tokenizer.encode(head))


def render(tokenizer: ChatTokenizer, query: str, answer: str, eos_token: str | None) -> str:
    """One conversation as the document text: the template with the default system turn, the
    user turn and the assistant turn; a final end-of-turn equal to `eos_token` (and the newline
    after it) is dropped, since the token pipeline ends every document with EOS."""
    text = tokenizer.apply_chat_template(
        [{"role": "user", "content": query}, {"role": "assistant", "content": answer}],
        add_generation_prompt=False,
    )
    if eos_token:
        stripped = text.rstrip("\n")
        if stripped.endswith(eos_token):
            text = stripped[: -len(eos_token)]
    return text


def _batches(n: int, size: int) -> list[range]:
    return [range(a, min(a + size, n)) for a in range(0, n, size)]


def sample_conversations(
    sample: SampleFn,
    tokenizer: ChatTokenizer,
    cfg: ChatConfig,
    progress: bool = False,
) -> list[dict[str, str]]:
    """[{"id", "query", "answer"}] sampled from the teacher (module docstring), in a fixed
    order for `cfg.seed`. Queries that are empty, cut off or repeated are dropped."""
    prefix = query_prefix(tokenizer)
    batches = _batches(cfg.conversations, cfg.batch_size)
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=2 * len(batches), desc="chat: sampling from the teacher", unit="batch")
    seen: set[str] = set()
    out: list[dict[str, str]] = []
    for bi, rows in enumerate(batches):
        base = cfg.seed * 1_000_003 + 4 * bi
        q_ids, ended = sample(
            [prefix] * len(rows),
            cfg.query_max_tokens,
            cfg.query_temperature,
            cfg.query_top_p,
            base,
        )
        queries = []
        for i, ids, ok in zip(rows, q_ids, ended, strict=True):
            q = tokenizer.decode(ids, skip_special=True).strip()
            if ok and q and q not in seen:
                seen.add(q)
                queries.append((i, q))
        if bar:
            bar.update(1)
        if not queries:
            if bar:
                bar.update(1)
            continue
        prompts = [tokenizer.encode_chat([{"role": "user", "content": q}]) for _, q in queries]
        heads = [[] for _ in prompts]
        if cfg.greedy_tokens:
            heads, head_ended = sample(prompts, cfg.greedy_tokens, 0.0, 1.0, base + 1)
        else:
            head_ended = [False] * len(prompts)
        rest_prompts = [p + h for p, h, e in zip(prompts, heads, head_ended, strict=True)]
        todo = [k for k, e in enumerate(head_ended) if not e]
        tails: dict[int, list[int]] = {}
        n_rest = cfg.answer_max_tokens - cfg.greedy_tokens
        if todo and n_rest > 0:
            got, _ = sample(
                [rest_prompts[k] for k in todo],
                n_rest,
                cfg.answer_temperature,
                cfg.answer_top_p,
                base + 2,
            )
            tails = dict(zip(todo, got, strict=True))
        for k, (i, q) in enumerate(queries):
            answer = tokenizer.decode(heads[k] + tails.get(k, []), skip_special=True).strip()
            if answer:
                out.append({"id": f"chat/{cfg.seed}/{i:06d}", "query": q, "answer": answer})
        if bar:
            bar.update(1)
    if bar:
        bar.close()
    return out


def domain_key(cfg: ChatConfig, teacher: str) -> str:
    """The prepared domain's key: the sampling settings, the teacher's identity, the version."""
    obj = {"chat": dataclasses.asdict(cfg), "teacher": teacher, "version": GENERATOR_VERSION}
    return hashlib.sha256(json.dumps(obj, sort_keys=True).encode()).hexdigest()[:16]


def is_current(cfg: ChatConfig, teacher: str, cache: str | Path | None = None) -> bool:
    """Whether the prepared chat domain was sampled with these settings from this teacher."""
    m = corpora.load_manifest(CHAT_DOMAIN, cache)
    return bool(m) and m.get("key") == domain_key(cfg, teacher)


def build_chat_domain(
    sample: SampleFn,
    tokenizer: ChatTokenizer,
    cfg: ChatConfig,
    teacher: str,
    cache: str | Path | None = None,
    progress: bool = False,
    force: bool = False,
) -> dict[str, Any]:
    """Samples the conversations and writes the prepared `chat` domain (splits + manifest).

    `teacher` identifies the model that sampled (part of the key: another teacher or other
    settings rebuild it). Returns the manifest; with an up-to-date domain and not `force`,
    returns it without sampling. Raises CorpusError when too few conversations survive for
    three splits."""
    if is_current(cfg, teacher, cache) and not force:
        return corpora.load_manifest(CHAT_DOMAIN, cache)
    convs = sample_conversations(sample, tokenizer, cfg, progress)
    eos = tokenizer.special_tokens.get("eos_token")
    docs = [Document(c["id"], render(tokenizer, c["query"], c["answer"], eos)) for c in convs]
    if len(docs) < 3:
        raise corpora.CorpusError(
            f"only {len(docs)} usable conversations were sampled; raise chat.conversations"
        )
    split = corpora.SplitConfig(seed=cfg.seed, validation=cfg.validation, test=cfg.test)
    manifest = corpora.write_splits(CHAT_DOMAIN, corpora.split_documents(docs, split), cache)
    fetch.atomic_write_text(
        corpora.domain_dir(CHAT_DOMAIN, cache) / "conversations.jsonl",
        "".join(json.dumps(c) + "\n" for c in convs),
    )
    manifest.update(
        key=domain_key(cfg, teacher),
        description=f"conversations sampled from {teacher} in its chat template",
        sources=[teacher],
        chat=dataclasses.asdict(cfg),
        conversations=len(convs),
    )
    manifest["split_config"] = dataclasses.asdict(split)
    fetch.atomic_write_text(
        corpora.domain_dir(CHAT_DOMAIN, cache) / "manifest.json", json.dumps(manifest, indent=1)
    )
    return manifest
