"""Tokenizers as each checkpoint's own runtime builds them: llama.cpp for GGUF, transformers for HF.

GGUF (`tokenizer.ggml.model`):
- `gpt2`: byte-level BPE after llama.cpp's pre-tokenizer for `tokenizer.ggml.pre` (the regex
  lists of llama.cpp's `llm_tokenizer_bpe`, applied in turn, each match and gap a piece):
  `default` (also when the key is absent), `llama-bpe` / `llama3` / `llama-v3` (digits in groups
  of at most three, `'S` kept whole, whole-word vocab hits skip the merges), `gpt-2`, `smollm`
  (digits one by one). Any other value is refused by name.
- `llama`: SentencePiece BPE (Llama-1/2, TinyLlama, Mistral): merges ranked by the merged
  piece's score, byte fallback to `<0xXX>`, a space prefix unless `add_space_prefix` is false.
BOS follows llama.cpp: `tokenizer.ggml.add_bos_token`, else true for SentencePiece and the
llama-bpe group. Chat prompts render the GGUF's `tokenizer.chat_template` with transformers'
sandboxed Jinja renderer; a rendered leading BOS is stripped when the tokenizer adds one, so the
prompt holds exactly one (as llama.cpp's chat code does).

HF directories load with `transformers.AutoTokenizer`: plain text gets the post-processor's BOS;
chat prompts are transformers' `apply_chat_template(tokenize=True)`, which adds no special tokens.

End-of-generation ids: every id the checkpoint declares (GGUF eos/eot/eom ids plus the control
tokens llama.cpp treats as end-of-generation by text; HF config.json, generation_config.json and
the tokenizer's eos token).
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
from pathlib import Path
from typing import Any

import tokenizers

import readme_jax.cache_dir as cache_dir
from readme_jax.checkpoints.errors import CheckpointError, TextError
from readme_jax.checkpoints.gguf import default_gguf_path, gguf_end_ids, gguf_identity, open_gguf

# llama.cpp's pre-tokenizer regexes (src/llama-vocab.cpp, llm_tokenizer_bpe), by `pre` name.
_GPT2_RE = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)"
_LLAMA3_RE = (
    r"(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])|[^\r\n\p{L}\p{N}]?\p{L}+|"
    r"\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_DEFAULT_RES = [r"[\p{P}\$\+<=>\^~\|]+", _GPT2_RE, r"\p{N}+", r"[0-9][0-9][0-9]"]
GGUF_PRE_SPLITS: dict[str, list[str]] = {
    "default": _DEFAULT_RES,
    "llama-bpe": [_LLAMA3_RE],
    "llama3": [_LLAMA3_RE],
    "llama-v3": [_LLAMA3_RE],
    "gpt-2": [_GPT2_RE],
    "smollm": [r"\p{N}", _GPT2_RE],
}
_LLAMA3_GROUP = ("llama-bpe", "llama3", "llama-v3")
_CONTROL, _USER_DEFINED, _NORMAL = 3, 4, 1
_HF_TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json")


class Tokenizer:
    """Uniform tokenizer API over a `tokenizers.Tokenizer` (GGUF) or a transformers tokenizer."""

    def __init__(
        self,
        backend: Any,
        *,
        name: str,
        bos_id: int | None,
        eos_ids: tuple[int, ...],
        add_bos: bool,
        chat_template: str | None,
        hf: bool = False,
        special_tokens: dict[str, str] | None = None,
    ):
        self._tok = backend
        self._hf = hf
        self.name = name
        self.bos_id = bos_id
        self.eos_ids = tuple(eos_ids)
        self.add_bos_default = add_bos
        self.chat_template = chat_template
        self.special_tokens = dict(special_tokens or {})  # bos_token etc., for the template

    @property
    def eos_id(self) -> int | None:
        return self.eos_ids[0] if self.eos_ids else None

    @property
    def vocab_size(self) -> int:
        return len(self._tok) if self._hf else self._tok.get_vocab_size()

    def encode(self, text: str, add_bos: bool | None = None) -> list[int]:
        """Token ids of plain text. add_bos None: as the tokenizer's runtime does (HF: its
        post-processor; GGUF: `add_bos_token`); True/False forces one leading BOS or none.
        Raises TextError for text that is not valid Unicode (e.g. undecodable argv bytes)."""
        _check_text(text)
        if self._hf:
            ids = list(self._tok.encode(text, add_special_tokens=add_bos is None))
            if add_bos is None:
                return ids
        else:
            ids = list(self._tok.encode(text, add_special_tokens=False).ids)
            if add_bos is None:
                add_bos = self.add_bos_default
        if add_bos and self.bos_id is not None and ids[:1] != [self.bos_id]:
            ids = [self.bos_id, *ids]
        return ids

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        if self._hf:
            return [self.encode(t) for t in texts]
        for t in texts:
            _check_text(t)
        encs = self._tok.encode_batch(texts, add_special_tokens=False)
        pre = [self.bos_id] if self.add_bos_default and self.bos_id is not None else []
        return [pre + list(e.ids) for e in encs]

    def decode(self, ids, skip_special: bool = False) -> str:
        return self._tok.decode(list(ids), skip_special_tokens=skip_special)

    def apply_chat_template(
        self, messages: list[dict[str, str]], add_generation_prompt=True
    ) -> str:
        """Render messages with the checkpoint's own chat template (transformers' sandboxed
        Jinja). Raises TextError when the checkpoint has no template or it fails to render."""
        if not self.chat_template:
            raise TextError(
                f"tokenizer {self.name} has no chat template; use a plain prompt (no chat)"
            )
        from jinja2.exceptions import TemplateError
        from transformers.utils.chat_template_utils import render_jinja_template

        try:
            if self._hf:  # transformers' own path (same renderer, its special tokens)
                return self._tok.apply_chat_template(
                    messages, tokenize=False, add_generation_prompt=add_generation_prompt
                )
            rendered, _ = render_jinja_template(
                conversations=[messages],
                chat_template=self.chat_template,
                add_generation_prompt=add_generation_prompt,
                **self.special_tokens,
            )
        except TemplateError as e:
            raise TextError(f"chat template of {self.name} failed: {e}") from e
        return rendered[0]

    def encode_chat(self, messages: list[dict[str, str]], add_generation_prompt=True) -> list[int]:
        """Prompt ids for a chat, holding exactly the one BOS the runtime would send.

        HF: transformers' own `apply_chat_template(tokenize=True)` (no special tokens added
        beyond what the template writes). GGUF: a leading BOS the template writes is
        dropped when the tokenizer adds its own (llama.cpp's common chat code)."""
        if self._hf:
            self.apply_chat_template(messages, add_generation_prompt)  # TextError if none
            ids = self._tok.apply_chat_template(
                messages,
                tokenize=True,
                add_generation_prompt=add_generation_prompt,
                return_dict=False,
            )
            return [int(i) for i in ids]
        text = self.apply_chat_template(messages, add_generation_prompt)
        bos = self.special_tokens.get("bos_token")
        if self.add_bos_default and bos and text.startswith(bos):
            text = text[len(bos) :]
        return self.encode(text)


def _check_text(text: str) -> None:
    if not isinstance(text, str):
        raise TextError(f"text must be a str, got {type(text).__name__}")
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        raise TextError(
            f"text is not valid UTF-8 (undecodable byte at character {e.start}); "
            "pass UTF-8 encoded text"
        ) from e


# --- GGUF ------------------------------------------------------------------------------------


def _val(reader, key: str, default: Any = None) -> Any:
    f = reader.fields.get(key)
    return default if f is None else f.contents()


def _spm_merges(tokens: list[str], scores, types) -> list[tuple[str, str]]:
    """SentencePiece BPE as ranked merges: every split of a normal piece into two vocab pieces,
    ranked by the merged piece's score (highest first), as transformers converts Llama's SPM."""
    vocab = {t: i for i, t in enumerate(tokens)}
    merges = []
    for i, piece in enumerate(tokens):
        if types is not None and int(types[i]) != _NORMAL:
            continue
        for k in range(1, len(piece)):
            left, right = piece[:k], piece[k:]
            if left in vocab and right in vocab:
                merges.append((-float(scores[i]), vocab[left], vocab[right], left, right))
    merges.sort()
    return [(m[3], m[4]) for m in merges]


def _special_added_tokens(tokens, types):
    from tokenizers import AddedToken

    if types is None:
        return []
    return [
        AddedToken(tokens[i], special=int(ty) == _CONTROL, normalized=False)
        for i, ty in enumerate(types)
        if int(ty) in (_CONTROL, _USER_DEFINED)
    ]


def _gguf_bpe(reader, path: Path):
    from tokenizers import Regex, decoders, models, pre_tokenizers
    from tokenizers import Tokenizer as HFTok

    tokens = _val(reader, "tokenizer.ggml.tokens")
    merges = _val(reader, "tokenizer.ggml.merges")
    if merges is None:
        raise CheckpointError(
            f"{path.name}: a gpt2 (BPE) GGUF vocabulary needs tokenizer.ggml.merges, and this "
            "file has none (llama.cpp refuses it too)"
        )
    pre = _val(reader, "tokenizer.ggml.pre", "default")
    if pre not in GGUF_PRE_SPLITS:
        raise CheckpointError(
            f"{path.name}: unsupported GGUF pre-tokenizer tokenizer.ggml.pre = {pre!r}; "
            f"readme_jax implements {sorted(GGUF_PRE_SPLITS)}"
        )
    vocab = {t: i for i, t in enumerate(tokens)}
    pairs = [tuple(m.split(" ", 1)) for m in merges]
    tok = HFTok(
        models.BPE(
            vocab=vocab,
            merges=pairs,
            fuse_unk=False,
            byte_fallback=False,
            ignore_merges=pre in _LLAMA3_GROUP,
        )
    )
    splits = [pre_tokenizers.Split(Regex(r), behavior="isolated") for r in GGUF_PRE_SPLITS[pre]]
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [*splits, pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)]
    )
    tok.decoder = decoders.ByteLevel()
    return tok, pre in _LLAMA3_GROUP


def _gguf_spm(reader, path: Path):
    from tokenizers import Tokenizer as HFTok
    from tokenizers import decoders, models, normalizers

    tokens = _val(reader, "tokenizer.ggml.tokens")
    scores = _val(reader, "tokenizer.ggml.scores")
    if scores is None:
        raise CheckpointError(f"{path.name}: a SentencePiece GGUF vocabulary needs scores")
    types = _val(reader, "tokenizer.ggml.token_type")
    unk = _val(reader, "tokenizer.ggml.unknown_token_id", 0)
    vocab = {t: i for i, t in enumerate(tokens)}
    tok = HFTok(
        models.BPE(
            vocab=vocab,
            merges=_spm_merges(tokens, scores, types),
            fuse_unk=True,
            byte_fallback=True,
            unk_token=tokens[int(unk)],
        )
    )
    prefix = bool(_val(reader, "tokenizer.ggml.add_space_prefix", True))
    norm = [normalizers.Prepend("▁")] if prefix else []
    tok.normalizer = normalizers.Sequence([*norm, normalizers.Replace(" ", "▁")])
    strip = [decoders.Strip(" ", 1, 0)] if prefix else []
    tok.decoder = decoders.Sequence(
        [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(), *strip]
    )
    return tok


def _load_gguf_tokenizer(path: Path) -> Tokenizer:
    reader = open_gguf(path)
    model = _val(reader, "tokenizer.ggml.model")
    tokens = _val(reader, "tokenizer.ggml.tokens")
    if tokens is None:
        raise CheckpointError(f"{path.name}: the GGUF holds no vocabulary (tokenizer.ggml.tokens)")
    if model == "gpt2":
        backend, bos_default = _gguf_bpe(reader, path)
    elif model == "llama":
        backend, bos_default = _gguf_spm(reader, path), True
    else:
        raise CheckpointError(
            f"{path.name}: unsupported GGUF tokenizer model {model!r}; readme_jax reads gpt2 "
            "(byte-level BPE) and llama (SentencePiece) vocabularies"
        )
    types = _val(reader, "tokenizer.ggml.token_type")
    backend.add_special_tokens(_special_added_tokens(tokens, types))
    h = hashlib.sha256()
    for k in ("tokenizer.ggml.tokens", "tokenizer.ggml.merges"):
        h.update("\n".join(_val(reader, k, [])).encode())
    # The name keys tokenized-data caches. gpt2 + smollm splits as before this module knew
    # other pre-tokenizers, so it keeps its old name (and the caches built with it).
    pre = _val(reader, "tokenizer.ggml.pre", "default")
    if (model, pre) != ("gpt2", "smollm"):
        h.update(f"\n{model}/{pre}/{_val(reader, 'tokenizer.ggml.scores', [])}".encode())
    bos = _val(reader, "tokenizer.ggml.bos_token_id")
    eos = _val(reader, "tokenizer.ggml.eos_token_id")
    named = {
        "bos_token": bos,
        "eos_token": eos,
        "unk_token": _val(reader, "tokenizer.ggml.unknown_token_id"),
        "pad_token": _val(reader, "tokenizer.ggml.padding_token_id"),
    }
    return Tokenizer(
        backend,
        name=f"gguf-{path.stem}-{h.hexdigest()[:12]}",
        bos_id=None if bos is None else int(bos),
        eos_ids=gguf_end_ids(reader),
        add_bos=bool(_val(reader, "tokenizer.ggml.add_bos_token", bos_default)),
        chat_template=_val(reader, "tokenizer.chat_template"),
        special_tokens={k: tokens[int(v)] for k, v in named.items() if v is not None},
    )


# --- Hugging Face ----------------------------------------------------------------------------


def _read_json(path: Path) -> dict[str, Any]:
    if not path.exists():
        return {}
    try:
        d = json.loads(path.read_text())
    except ValueError as e:
        raise CheckpointError(f"{path}: not valid JSON ({e})") from e
    return d if isinstance(d, dict) else {}


def _ids(v: Any) -> list[int]:
    if v is None:
        return []
    return [int(x) for x in v] if isinstance(v, list) else [int(v)]


def hf_end_ids(root: str | Path) -> tuple[int, ...]:
    """Every end id an HF directory declares: generation_config.json's eos_token_id (what
    transformers' generate stops on), config.json's, and the tokenizer's eos token."""
    root = Path(root)
    ids = _ids(_read_json(root / "generation_config.json").get("eos_token_id"))
    ids += _ids(_read_json(root / "config.json").get("eos_token_id"))
    eos = _read_json(root / "tokenizer_config.json").get("eos_token")
    eos = eos.get("content") if isinstance(eos, dict) else eos
    if isinstance(eos, str) and (root / "tokenizer.json").exists():
        from tokenizers import Tokenizer as HFTok

        tid = HFTok.from_file(str(root / "tokenizer.json")).token_to_id(eos)
        ids += [] if tid is None else [tid]
    return tuple(dict.fromkeys(ids))


def _load_hf(path: Path) -> Tokenizer:
    if not any((path / f).exists() for f in _HF_TOKENIZER_FILES):
        raise CheckpointError(
            f"{path}: no tokenizer files (tokenizer.json, or tokenizer.model with "
            "tokenizer_config.json); copy them from the model's original directory"
        )
    try:
        from transformers import AutoTokenizer

        tok = AutoTokenizer.from_pretrained(str(path), local_files_only=True)
    except Exception as e:
        raise CheckpointError(
            f"could not load a tokenizer from {path}: {type(e).__name__}: {e}"
        ) from e
    eos = hf_end_ids(path) or _ids(tok.eos_token_id)
    named = {k: getattr(tok, k, None) for k in ("bos_token", "eos_token", "unk_token", "pad_token")}
    return Tokenizer(
        tok,
        name=f"hf-{path.name}-{len(tok)}-pp",  # -pp: encodes with the post-processor (BOS)
        bos_id=tok.bos_token_id,
        eos_ids=tuple(eos),
        add_bos=bool(getattr(tok, "add_bos_token", False)),
        chat_template=tok.chat_template,
        hf=True,
        special_tokens={k: v for k, v in named.items() if isinstance(v, str)},
    )


def load_tokenizer(path: str | Path | None = None) -> Tokenizer:
    """Tokenizer for a GGUF file, an HF directory, or (default) the bundled SmolLM2 GGUF.
    Raises CheckpointError for a missing path, an unsupported or incomplete vocabulary."""
    path = Path(path) if path is not None else default_gguf_path()
    if path.is_dir():
        return _load_hf(path)
    return _cached_gguf_tokenizer(gguf_identity(path), str(path))


# A GGUF vocabulary takes seconds to parse (the `gguf` reader walks 49k tokens and merges one by
# one), so a parsed one is kept: in this process per file identity, and on disk as the
# `tokenizers` JSON under the cache directory (readme_jax/cache_dir.py: $READMEJAX_CACHE_DIR or
# ~/.cache/readme_jax; "off" disables it), keyed by the file's identity, the `tokenizers` version
# and the source of the modules that build a tokenizer (so a change to them is never masked).
_DISK_FORMAT = 1


@functools.cache
def _builder_source_hash() -> str:
    h = hashlib.sha256()
    for f in (Path(__file__), Path(__file__).with_name("gguf.py")):
        h.update(f.read_bytes())
    return h.hexdigest()[:16]


def _disk_cache_file(identity: tuple, path: str) -> Path | None:
    root = cache_dir.memo_root()
    if root is None:
        return None
    key = json.dumps(
        [_DISK_FORMAT, tokenizers.__version__, _builder_source_hash(), *identity, path]
    )
    return Path(root) / "tokenizers" / (hashlib.sha256(key.encode()).hexdigest()[:32] + ".json")


@functools.lru_cache(maxsize=8)
def _cached_gguf_tokenizer(identity: tuple, path: str) -> Tokenizer:
    """One Tokenizer per GGUF file identity (nothing mutates a Tokenizer after it is built);
    read from the disk cache when there, else parsed and written there (best effort: a cache
    that cannot be read or written is rebuilt or skipped, never an error)."""
    f = _disk_cache_file(identity, path)
    if f is not None and f.is_file():
        try:
            d = json.loads(f.read_text())
            backend = tokenizers.Tokenizer.from_str(d.pop("backend"))
            return Tokenizer(backend, **d)
        except Exception:  # a torn or foreign file: rebuild it
            pass
    tok = _load_gguf_tokenizer(Path(path))
    if f is not None:
        d = dict(backend=tok._tok.to_str(), name=tok.name, bos_id=tok.bos_id,
                 eos_ids=list(tok.eos_ids), add_bos=tok.add_bos_default,
                 chat_template=tok.chat_template, special_tokens=tok.special_tokens)  # fmt: skip
        try:
            f.parent.mkdir(parents=True, exist_ok=True)
            tmp = f.with_suffix(f".{os.getpid()}.tmp")
            tmp.write_text(json.dumps(d))
            os.replace(tmp, f)
            for old in sorted(f.parent.glob("*.json"), key=lambda q: q.stat().st_mtime)[:-32]:
                old.unlink(missing_ok=True)  # the 32 newest stay
        except OSError:
            pass
    return tok


def prompt_ids(tok: Tokenizer, prompt: str, chat: bool) -> list[int]:
    """Prompt token ids: plain text as the runtime encodes it, or (chat) one user message in
    the checkpoint's template. Raises TextError (invalid UTF-8, no chat template)."""
    if chat:
        return tok.encode_chat([{"role": "user", "content": prompt}])
    return tok.encode(prompt)


def with_end_ids(cfg, tok: Tokenizer):
    """cfg (a LlamaConfig) with the tokenizer's end ids added to cfg.eos_ids, so the decode
    loop and the serving engine stop on every one (older saves kept only the first)."""
    ids = tuple(dict.fromkeys((*cfg.eos_ids, *tok.eos_ids)))
    return cfg if ids == tuple(cfg.eos_ids) else cfg.replace(eos_ids=ids)
