"""Tokenizers: built from GGUF BPE metadata with `tokenizers`, or AutoTokenizer for HF dirs.

SmolLM2's GGUF says `tokenizer.ggml.pre = smollm`: digits are split one by one before the
byte-level BPE. transformers' GGUF converter drops that rule, so we build the pipeline here.
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

from readme_jax.checkpoints.errors import CheckpointError
from readme_jax.checkpoints.gguf import default_gguf_path, open_gguf

CHATML_TEMPLATE = "chatml"
DEFAULT_SYSTEM = "You are a helpful AI assistant named SmolLM, trained by Hugging Face"


class Tokenizer:
    """Uniform tokenizer API over a `tokenizers.Tokenizer` or a transformers tokenizer."""

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
    ):
        self._tok = backend
        self._hf = hf
        self.name = name
        self.bos_id = bos_id
        self.eos_ids = tuple(eos_ids)
        self.add_bos_default = add_bos
        self.chat_template = chat_template

    @property
    def eos_id(self) -> int | None:
        return self.eos_ids[0] if self.eos_ids else None

    @property
    def vocab_size(self) -> int:
        return len(self._tok) if self._hf else self._tok.get_vocab_size()

    def encode(self, text: str, add_bos: bool | None = None) -> list[int]:
        add_bos = self.add_bos_default if add_bos is None else add_bos
        if self._hf:
            ids = self._tok.encode(text, add_special_tokens=False)
        else:
            ids = self._tok.encode(text, add_special_tokens=False).ids
        if add_bos and self.bos_id is not None:
            ids = [self.bos_id, *ids]
        return list(ids)

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        if self._hf:
            return [self.encode(t) for t in texts]
        encs = self._tok.encode_batch(texts, add_special_tokens=False)
        pre = [self.bos_id] if self.add_bos_default and self.bos_id is not None else []
        return [pre + list(e.ids) for e in encs]

    def decode(self, ids, skip_special: bool = False) -> str:
        return self._tok.decode(list(ids), skip_special_tokens=skip_special)

    def apply_chat_template(
        self, messages: list[dict[str, str]], add_generation_prompt=True
    ) -> str:
        """Render messages as a prompt string (ChatML for SmolLM2-Instruct)."""
        if self._hf and getattr(self._tok, "chat_template", None):
            return self._tok.apply_chat_template(
                messages, tokenize=False, add_generation_prompt=add_generation_prompt
            )
        if self.chat_template is None:
            raise ValueError(f"tokenizer {self.name} has no chat template")
        out = []
        if messages and messages[0]["role"] != "system":
            out.append(f"<|im_start|>system\n{DEFAULT_SYSTEM}<|im_end|>\n")
        for m in messages:
            out.append(f"<|im_start|>{m['role']}\n{m['content']}<|im_end|>\n")
        if add_generation_prompt:
            out.append("<|im_start|>assistant\n")
        return "".join(out)


def _gguf_backend(reader, pre: str):
    from tokenizers import AddedToken, decoders, models, pre_tokenizers
    from tokenizers import Tokenizer as HFTok

    f = reader.fields
    tokens = f["tokenizer.ggml.tokens"].contents()
    merges = f["tokenizer.ggml.merges"].contents()
    types = f["tokenizer.ggml.token_type"].contents() if "tokenizer.ggml.token_type" in f else None
    vocab = {t: i for i, t in enumerate(tokens)}
    merges = [tuple(m.split(" ", 1)) for m in merges]
    bpe = models.BPE(vocab=vocab, merges=merges, fuse_unk=False, byte_fallback=False)
    tok = HFTok(bpe)
    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    if pre == "smollm":
        tok.pre_tokenizer = pre_tokenizers.Sequence(
            [pre_tokenizers.Digits(individual_digits=True), byte_level]
        )
    elif pre in ("gpt2", "default", "llama-bpe", "smaug-bpe"):
        tok.pre_tokenizer = byte_level
    else:
        raise CheckpointError(f"unsupported GGUF pre-tokenizer {pre!r}")
    tok.decoder = decoders.ByteLevel()
    if types is not None:  # 3 = control tokens (<|im_start|> etc.): never split by BPE
        special = [
            AddedToken(tokens[i], special=True, normalized=False)
            for i, ty in enumerate(types)
            if int(ty) == 3
        ]
        tok.add_special_tokens(special)
    return tok


def load_tokenizer(path: str | Path | None = None) -> Tokenizer:
    """Tokenizer for a GGUF file, an HF directory, or (default) the bundled SmolLM2 GGUF."""
    path = Path(path) if path is not None else default_gguf_path()
    if path.is_dir():
        return _load_hf(path)
    reader = open_gguf(path)
    f = reader.fields
    model = f["tokenizer.ggml.model"].contents() if "tokenizer.ggml.model" in f else None
    if model != "gpt2":
        raise CheckpointError(
            f"{path.name}: unsupported GGUF tokenizer model {model!r} (need gpt2 BPE)"
        )
    pre = f["tokenizer.ggml.pre"].contents() if "tokenizer.ggml.pre" in f else "default"

    def val(k, d=None):
        return f[k].contents() if k in f else d

    h = hashlib.sha256()
    for k in ("tokenizer.ggml.tokens", "tokenizer.ggml.merges"):
        h.update("\n".join(val(k, [])).encode())
    tpl = val("tokenizer.chat_template")
    eos = val("tokenizer.ggml.eos_token_id")
    tokens = val("tokenizer.ggml.tokens")
    eos_ids = [int(eos)] if eos is not None else []
    if tpl and "<|im_end|>" in tpl and "<|im_end|>" in tokens:  # ChatML ends turns with <|im_end|>
        im_end = tokens.index("<|im_end|>")
        if im_end not in eos_ids:
            eos_ids.append(im_end)
    return Tokenizer(
        _gguf_backend(reader, pre),
        name=f"gguf-{path.stem}-{h.hexdigest()[:12]}",
        bos_id=val("tokenizer.ggml.bos_token_id"),
        eos_ids=tuple(eos_ids),
        add_bos=bool(val("tokenizer.ggml.add_bos_token", False)),
        chat_template=CHATML_TEMPLATE if tpl and "<|im_start|>" in tpl else None,
    )


def _load_hf(path: Path) -> Tokenizer:
    try:
        from transformers import AutoTokenizer

        tok = AutoTokenizer.from_pretrained(str(path), local_files_only=True)
    except Exception as e:
        raise CheckpointError(f"could not load a tokenizer from {path}: {e}") from e
    eos = tok.eos_token_id
    return Tokenizer(
        tok,
        name=f"hf-{path.name}-{len(tok)}",
        bos_id=tok.bos_token_id,
        eos_ids=(eos,) if eos is not None else (),
        add_bos=bool(getattr(tok, "add_bos_token", False)),
        chat_template=tok.chat_template,
        hf=True,
    )
