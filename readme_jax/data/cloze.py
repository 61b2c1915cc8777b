"""A LAMBADA-style cloze task from a prepared domain's held-out documents: predict the last word
of a passage.

A passage is about `words` whitespace-separated words of one document (joined by single spaces,
as LAMBADA's passages are) ending, as LAMBADA's do, at the last word of a sentence: a word of
letters only, at least `min_len` of them, followed by ".", "!" or "?" (the punctuation is
dropped: "flood." -> "flood"). Passages do not overlap; they are taken
round-robin over the documents (every document's first passage, then every second one, ...) so
that a prefix of the file (lm_eval's --limit) spreads over the documents. Rows are
{"domain", "doc_id", "context", "target"}; the model scores " " + target after the context.

The file `$READMEJAX_CACHE_DIR/tasks/cloze_<domain>_<split>.jsonl` is written on first use from the
split that `launch/data.py` prepared (data/corpora.py), and rebuilt when the split changes.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import readme_jax.data.corpora as corpora
import readme_jax.data.fetch as fetch
from readme_jax.data.extract import Document

PASSAGE_WORDS = 64
MIN_TARGET_LEN = 3
TRAILING = ".,;:!?\"')]}"
VERSION = 1  # bump when passages are cut differently


def _target(word: str, min_len: int) -> str | None:
    """The word without its sentence-ending punctuation, if it qualifies as a target."""
    core = word.rstrip(TRAILING)
    if not any(c in ".!?" for c in word[len(core) :]):
        return None
    return core if len(core) >= min_len and core.isascii() and core.isalpha() else None


def doc_passages(
    doc: Document, words: int = PASSAGE_WORDS, min_len: int = MIN_TARGET_LEN
) -> list[dict[str, str]]:
    """The non-overlapping passages of one document, in order: each holds `words` - 1 words
    of context and ends at the first word that qualifies as a target (see module doc)."""
    toks = doc.text.split()
    out, start = [], 0
    while start + words <= len(toks):
        end = start + words - 1  # index of the candidate target
        while end < len(toks) and _target(toks[end], min_len) is None:
            end += 1
        if end >= len(toks):
            break
        ctx = " ".join(toks[end - words + 1 : end])
        out.append({"doc_id": doc.doc_id, "context": ctx, "target": _target(toks[end], min_len)})
        start = end + 1
    return out


def cloze_rows(
    domain: str, docs: Sequence[Document], limit: int | None = None, **kw: Any
) -> list[dict[str, str]]:
    """Passages of all documents, round-robin over documents, at most `limit` of them."""
    per_doc = [doc_passages(d, **kw) for d in docs]
    rows = []
    for k in range(max((len(p) for p in per_doc), default=0)):
        rows += [{"domain": domain, **p[k]} for p in per_doc if k < len(p)]
    return rows[:limit]


def cloze_path(domain: str, split: str = "test", cache: str | Path | None = None) -> Path:
    return fetch.cache_root(cache) / "tasks" / f"cloze_{domain}_{split}.jsonl"


def _key(domain: str, split: str, cache) -> str:
    manifest = corpora.load_manifest(domain, cache) or {}
    blob = json.dumps([VERSION, PASSAGE_WORDS, MIN_TARGET_LEN, manifest], sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def prepare_cloze(domain: str, split: str = "test", cache: str | Path | None = None) -> Path:
    """The cloze file of a prepared domain split (written when missing or stale); its first
    line is a header {"key": ...} naming the split it was cut from. Raises CorpusError when the
    domain is not prepared."""
    path = cloze_path(domain, split, cache)
    key = _key(domain, split, cache)
    if path.is_file():
        with open(path, encoding="utf-8") as f:
            if json.loads(f.readline() or "{}").get("key") == key:
                return path
    rows = cloze_rows(domain, corpora.load_documents(domain, split, cache))
    if not rows:
        raise corpora.CorpusError(f"domain {domain!r} ({split}) yields no cloze passages")
    lines = [json.dumps({"key": key, "n": len(rows)})] + [json.dumps(r) for r in rows]
    fetch.atomic_write_text(path, "\n".join(lines) + "\n")
    return path


def load_cloze(domain: str, split: str = "test", cache: str | Path | None = None) -> list[dict]:
    """The cloze rows of a domain (prepared on first use; see `prepare_cloze`)."""
    with open(prepare_cloze(domain, split, cache), encoding="utf-8") as f:
        f.readline()
        return [json.loads(line) for line in f if line.strip()]
