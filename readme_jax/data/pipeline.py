"""Token caches and the grain input pipeline: packed, domain-labelled, shuffled, resumable.

Tokenization happens once per (tokenizer, domain, split). The cache holds, under
`$READMEJAX_CACHE_DIR/tokens/<tokenizer name>/<domain>/`:
  <split>.npy          uint32 [T]: every document's tokens, each followed by EOS
  <split>.offsets.npy  int64 [N+1]: where each document starts in the stream (and T at the end)
  <split>.json         counts (documents, tokens, UTF-8 bytes) and the checksum of its text

Packing is concatenate-then-split: row i of a domain is stream[i*S : i*S + S + 1] (inputs are
the first S, targets the last S). Rows never pad and never waste a token, and documents are
kept apart by segment ids, so attention and the loss never cross a document boundary.

Batch layout (numpy, one process's share of the global batch; B = batch_size // processes):
  tokens       int32   [B, S]  input token ids
  targets      int32   [B, S]  next-token ids (tokens shifted left by one)
  loss_mask    float32 [B, S]  1 where the target is in the same document as the input
  segment_ids  int32   [B, S]  1, 2, ... per document within the row; 0 for padding
  positions    int32   [B, S]  position within the segment, restarting at 0 at each document
                               start and at the row start (RoPE only sees relative offsets)
  domain       int32   [B, S]  index into the configured domain list (padding: row's domain)
Padding (segment 0, loss_mask 0) appears only in the tail rows of `eval_batches`.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any, Protocol

import grain
import numpy as np

import readme_jax.data.corpora as corpora
import readme_jax.data.fetch as fetch

BATCH_KEYS = ("tokens", "targets", "loss_mask", "segment_ids", "positions", "domain")


class TokenizerLike(Protocol):
    name: str

    @property
    def eos_id(self) -> int | None: ...
    @property
    def vocab_size(self) -> int: ...
    def encode(self, text: str) -> list[int]: ...


@dataclasses.dataclass(frozen=True)
class PipelineConfig:
    """The training input: which domains, how mixed, and how packed."""

    domains: tuple[str, ...] = corpora.DEFAULT_DOMAINS
    seq_len: int = 512
    batch_size: int = 8  # global; each process gets batch_size // process_count rows
    split: str = "train"
    weights: Mapping[str, float] | None = None  # default: uniform over domains
    seed: int = 0
    num_threads: int = 2
    prefetch: int = 16  # batches buffered ahead of the consumer


# ---------------------------------------------------------------- token cache
def _token_dir(tokenizer: TokenizerLike, domain: str, cache: str | Path | None) -> Path:
    name = str(getattr(tokenizer, "name", None) or type(tokenizer).__name__)
    safe = "".join(c if c.isalnum() or c in "-_." else "_" for c in name)
    return fetch.cache_root(cache) / "tokens" / safe / domain


def _encode_all(tokenizer: TokenizerLike, texts: list[str], progress: bool) -> list[list[int]]:
    batch = getattr(tokenizer, "encode_batch", None)
    chunks = [texts[i : i + 64] for i in range(0, len(texts), 64)]
    if progress:
        from tqdm.auto import tqdm

        chunks = tqdm(chunks, desc="tokenizing", unit="chunk", leave=False)
    out: list[list[int]] = []
    for chunk in chunks:
        out += batch(chunk) if batch else [tokenizer.encode(t) for t in chunk]
    return out


def prepare_tokens(
    domain: str,
    split: str,
    tokenizer: TokenizerLike,
    cache: str | Path | None = None,
    progress: bool = False,
) -> dict[str, Any]:
    """Tokenizes a prepared domain split once and caches it; returns the cache metadata."""
    manifest = corpora.load_manifest(domain, cache)
    if manifest is None:
        corpora.load_documents(domain, split, cache)  # raises the "not prepared" error
    text_sha = manifest["splits"][split]["sha256"]
    d = _token_dir(tokenizer, domain, cache)
    meta_path = d / f"{split}.json"
    if meta_path.is_file():
        meta = json.loads(meta_path.read_text())
        if meta.get("text_sha256") == text_sha and (d / f"{split}.npy").is_file():
            return meta
    docs = corpora.load_documents(domain, split, cache)
    eos = tokenizer.eos_id
    ids = _encode_all(tokenizer, [doc.text for doc in docs], progress)
    lengths = np.array([len(x) + (eos is not None) for x in ids], dtype=np.int64)
    offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
    tokens = np.empty(int(offsets[-1]), dtype=np.uint32)
    for x, a, n in zip(ids, offsets[:-1], lengths, strict=True):
        tokens[a : a + len(x)] = x
        if eos is not None:
            tokens[a + n - 1] = eos
    meta = {
        "domain": domain,
        "split": split,
        "tokenizer": str(getattr(tokenizer, "name", "")),
        "vocab_size": int(tokenizer.vocab_size),
        "eos_id": eos,
        "documents": len(docs),
        "tokens": int(tokens.size),
        "bytes": int(manifest["splits"][split]["bytes"]),
        "text_sha256": text_sha,
    }
    for suffix, arr in (("npy", tokens), ("offsets.npy", offsets)):
        _atomic_save(d / f"{split}.{suffix}", arr)
    fetch.atomic_write_text(meta_path, json.dumps(meta, indent=1))
    return meta


def _atomic_save(path: Path, arr: np.ndarray) -> None:
    import io

    buf = io.BytesIO()
    np.save(buf, arr)
    fetch.atomic_write_bytes(path, buf.getvalue())


def load_tokens(
    domain: str, split: str, tokenizer: TokenizerLike, cache: str | Path | None = None
) -> np.ndarray:
    """The split's token stream, uint32 [T] (memory-mapped); documents end with EOS."""
    prepare_tokens(domain, split, tokenizer, cache)
    return np.load(_token_dir(tokenizer, domain, cache) / f"{split}.npy", mmap_mode="r")


def load_offsets(
    domain: str, split: str, tokenizer: TokenizerLike, cache: str | Path | None = None
) -> np.ndarray:
    """Document start offsets into `load_tokens(...)`, int64 [N+1]."""
    prepare_tokens(domain, split, tokenizer, cache)
    return np.load(_token_dir(tokenizer, domain, cache) / f"{split}.offsets.npy")


def token_stats(
    domain: str, split: str, tokenizer: TokenizerLike, cache: str | Path | None = None
) -> dict[str, Any]:
    """{"documents", "tokens", "bytes", ...}: bytes are UTF-8 bytes of the text, for
    bits-per-byte = total NLL in nats / (bytes * ln 2)."""
    return prepare_tokens(domain, split, tokenizer, cache)


# ---------------------------------------------------------------- windows
class TokenWindows:
    """Random access to the S-token rows of one domain split (concatenate-then-split).

    Picklable without copying the stream: the memmap is reopened lazily in each process.
    """

    def __init__(
        self,
        path: Path,
        offsets: np.ndarray,
        seq_len: int,
        domain_index: int,
        pad_tail: bool = False,
    ):
        self.path, self.offsets, self.seq_len = Path(path), offsets, seq_len
        self.domain_index = domain_index
        self._tokens: np.ndarray | None = None
        total = int(offsets[-1])
        self.length = -(-(total - 1) // seq_len) if pad_tail else (total - 1) // seq_len

    @classmethod
    def open(
        cls,
        domain: str,
        split: str,
        tokenizer: TokenizerLike,
        seq_len: int,
        domain_index: int = 0,
        cache: str | Path | None = None,
        pad_tail: bool = False,
    ) -> TokenWindows:
        offsets = load_offsets(domain, split, tokenizer, cache)
        path = _token_dir(tokenizer, domain, cache) / f"{split}.npy"
        return cls(path, offsets, seq_len, domain_index, pad_tail)

    def __getstate__(self):
        return {**self.__dict__, "_tokens": None}

    @property
    def tokens(self) -> np.ndarray:
        if self._tokens is None:
            self._tokens = np.load(self.path, mmap_mode="r")
        return self._tokens

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, i: int) -> dict[str, np.ndarray]:
        S = self.seq_len
        start = int(i) * S
        w = np.asarray(self.tokens[start : start + S + 1], dtype=np.int32)
        n = len(w) - 1  # real inputs in this row (< S only in a padded tail row)
        doc = np.searchsorted(self.offsets, start + np.arange(n + 1), side="right") - 1
        new_seg = np.concatenate([[True], doc[1:n] != doc[: n - 1]])
        seg = np.cumsum(new_seg).astype(np.int32)
        idx = np.arange(n, dtype=np.int32)
        seg_start = np.maximum.accumulate(np.where(new_seg, idx, 0))
        out = {
            "tokens": w[:n],
            "targets": w[1:],
            "loss_mask": (doc[1:] == doc[:n]).astype(np.float32),
            "segment_ids": seg,
            "positions": idx - seg_start,
            "domain": np.full(n, self.domain_index, np.int32),
        }
        if n < S:
            for k, v in out.items():
                fill = self.domain_index if k == "domain" else 0
                out[k] = np.concatenate([v, np.full(S - n, fill, v.dtype)])
        return out


def _domain_seed(seed: int, index: int) -> int:
    return int(np.random.SeedSequence([seed, index]).generate_state(1)[0])


def _weights(cfg: PipelineConfig) -> list[float]:
    if cfg.weights is None:
        return [1.0] * len(cfg.domains)
    unknown = set(cfg.weights) - set(cfg.domains)
    if unknown:
        raise ValueError(f"mixture weights for unknown domains {sorted(unknown)}")
    w = [float(cfg.weights.get(d, 0.0)) for d in cfg.domains]
    if any(x < 0 for x in w) or sum(w) <= 0:
        raise ValueError(f"mixture weights must be >= 0 with a positive sum, got {w}")
    return w


def make_dataset(
    cfg: PipelineConfig,
    tokenizer: TokenizerLike,
    cache: str | Path | None = None,
    process_index: int | None = None,
    process_count: int | None = None,
) -> grain.MapDataset:
    """An infinite MapDataset of this process's batches (dicts of [B, S] arrays).

    Each domain's rows are shuffled by (seed, domain) with a fresh permutation every epoch,
    then domains are interleaved by `cfg.weights`; global row k goes to process
    k % process_count, so processes see disjoint rows.
    """
    if process_index is None or process_count is None:
        import jax

        process_index, process_count = jax.process_index(), jax.process_count()
    if cfg.batch_size % process_count:
        raise ValueError(f"batch_size {cfg.batch_size} not divisible by {process_count} processes")
    weights = _weights(cfg)
    parts, kept = [], []
    for i, domain in enumerate(cfg.domains):
        if weights[i] == 0:
            continue
        win = TokenWindows.open(domain, cfg.split, tokenizer, cfg.seq_len, i, cache)
        if len(win) == 0:
            raise corpora.CorpusError(
                f"domain {domain!r} split {cfg.split!r} has fewer than seq_len+1 = "
                f"{cfg.seq_len + 1} tokens"
            )
        ds = grain.MapDataset.range(len(win)).shuffle(seed=_domain_seed(cfg.seed, i))
        parts.append(ds.repeat(None).map(win.__getitem__))
        kept.append(weights[i])
    ds = grain.MapDataset.mix(parts, kept) if len(parts) > 1 else parts[0]
    ds = ds[process_index::process_count]
    return ds.batch(cfg.batch_size // process_count, drop_remainder=True)


def make_iterator(
    cfg: PipelineConfig,
    tokenizer: TokenizerLike,
    cache: str | Path | None = None,
    state: Mapping[str, Any] | None = None,
    process_index: int | None = None,
    process_count: int | None = None,
) -> grain.DatasetIterator:
    """A prefetching iterator of batches; `get_state()`/`set_state()` make it resumable."""
    ds = make_dataset(cfg, tokenizer, cache, process_index, process_count)
    options = grain.ReadOptions(num_threads=cfg.num_threads, prefetch_buffer_size=cfg.prefetch)
    it = iter(ds.to_iter_dataset(options))
    if state is not None:
        it.set_state(dict(state))
    return it


# ---------------------------------------------------------------- eval and calibration
def eval_batches(
    domain: str,
    split: str,
    tokenizer: TokenizerLike,
    seq_len: int,
    batch_size: int,
    cache: str | Path | None = None,
    domain_index: int = 0,
) -> Iterator[dict[str, np.ndarray]]:
    """Every token of a split once, in order, as [B, S] batches; the last ones are padded
    (segment_ids 0, loss_mask 0). The first token of each document is never a target."""
    win = TokenWindows.open(domain, split, tokenizer, seq_len, domain_index, cache, pad_tail=True)
    for a in range(0, len(win), batch_size):
        rows = [win[i] for i in range(a, min(a + batch_size, len(win)))]
        while len(rows) < batch_size:
            pad = {k: np.zeros_like(v) for k, v in rows[0].items()}
            pad["domain"][:] = domain_index
            rows.append(pad)
        yield {k: np.stack([r[k] for r in rows]) for k in BATCH_KEYS}


def calibration_batch(
    domain: str,
    split: str,
    tokenizer: TokenizerLike,
    num_sequences: int,
    seq_len: int,
    seed: int = 0,
    cache: str | Path | None = None,
    allow_fewer: bool = False,
) -> dict[str, np.ndarray]:
    """`num_sequences` rows of `seq_len` contiguous tokens of one domain, as a [N, S] batch.

    Rows inside a single document are preferred; rows that span documents carry segment ids.
    A split with fewer rows raises CorpusError, or with `allow_fewer` gives all it has (a small
    domain such as the sampled `chat` one); none at all always raises.
    """
    win = TokenWindows.open(domain, split, tokenizer, seq_len, 0, cache)
    if allow_fewer and len(win) > 0:
        num_sequences = min(num_sequences, len(win))
    if len(win) < num_sequences:
        raise corpora.CorpusError(
            f"domain {domain!r} split {split!r} has {len(win)} rows of {seq_len} tokens, "
            f"fewer than the {num_sequences} requested"
        )
    starts = np.arange(len(win)) * seq_len
    doc_a = np.searchsorted(win.offsets, starts, side="right")
    doc_b = np.searchsorted(win.offsets, starts + seq_len - 1, side="right")
    order = np.random.default_rng(seed).permutation(len(win))
    order = order[np.argsort(doc_a[order] != doc_b[order], kind="stable")]  # whole-doc first
    rows = [win[int(i)] for i in np.sort(order[:num_sequences])]
    return {k: np.stack([r[k] for r in rows]) for k in BATCH_KEYS}


def split_table(
    domains: Sequence[str],
    tokenizer: TokenizerLike,
    cache: str | Path | None = None,
    progress: bool = False,
) -> dict[str, dict[str, dict[str, int]]]:
    """{domain: {split: {"documents", "tokens", "bytes"}}}, tokenizing where needed."""
    out = {}
    for d in domains:
        out[d] = {}
        for s in corpora.SPLITS:
            m = prepare_tokens(d, s, tokenizer, cache, progress)
            out[d][s] = {k: m[k] for k in ("documents", "tokens", "bytes")}
    return out
