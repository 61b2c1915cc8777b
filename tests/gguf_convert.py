"""Write a llama GGUF from a Hugging Face fixture directory the way llama.cpp's converter does.

Follows convert_hf_to_gguf.py's LlamaModel: llama.cpp tensor names, q/k rows permuted for
interleaved RoPE (`_permute`), `rope_freqs.weight` computed from a llama3 `rope_scaling`, linear
scaling as `rope.scaling.type`, a gpt2 (BPE) vocabulary from tokenizer.json or a llama
(SentencePiece) one from the pieces/scores/types the fixture saved from tokenizer.model, special
ids, `add_bos_token` and the chat template. Used by tests only; `meta` overrides or removes
(value None) any metadata key so each test can build the variant it needs. `experts=E` writes
a Mixtral-style MoE as llama.cpp's converter does: each layer's FFN as stacked
`ffn_{gate,up,down}_exps` tensors of E copies plus an `ffn_gate_inp` router, and no dense
`ffn_gate`/`ffn_up`/`ffn_down` (the expert_count metadata is left to `meta`).
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import gguf
import numpy as np
from safetensors.numpy import load_file

_LAYER = {
    "input_layernorm": "attn_norm", "self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k",
    "self_attn.v_proj": "attn_v", "self_attn.o_proj": "attn_output",
    "post_attention_layernorm": "ffn_norm", "mlp.gate_proj": "ffn_gate",
    "mlp.up_proj": "ffn_up", "mlp.down_proj": "ffn_down",
}  # fmt: skip


def _permute(w: np.ndarray, n_head: int) -> np.ndarray:
    """convert_hf_to_gguf's LlamaModel.permute: rotate-half rows -> interleaved pairs."""
    return (
        w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:])
        .swapaxes(1, 2)
        .reshape(w.shape)
    )


def llama3_rope_factors(hp: dict[str, Any]) -> np.ndarray:
    """The rope_freqs.weight llama.cpp's converter writes for a llama3 rope_scaling."""
    rs = hp.get("rope_scaling") or hp.get("rope_parameters")
    base = hp.get("rope_theta", rs.get("rope_theta", 10000.0))
    dim = hp.get("head_dim") or hp["hidden_size"] // hp["num_attention_heads"]
    freqs = 1.0 / (base ** (np.arange(0, dim, 2, dtype=np.float32) / dim))
    factor, lo, hi = rs["factor"], rs["low_freq_factor"], rs["high_freq_factor"]
    old = rs["original_max_position_embeddings"]
    out = []
    for f in freqs:
        wavelen = 2 * math.pi / f
        if wavelen < old / hi:
            out.append(1.0)
        elif wavelen > old / lo:
            out.append(factor)
        else:
            smooth = (old / wavelen - lo) / (hi - lo)
            out.append(1 / ((1 - smooth) / factor + smooth))
    return np.asarray(out, np.float32)


def _bpe_vocab(d: Path) -> dict[str, Any]:
    tj = json.loads((d / "tokenizer.json").read_text())
    vocab = dict(tj["model"]["vocab"])
    added = {t["content"]: t for t in tj.get("added_tokens", [])}
    for t in added.values():
        vocab[t["content"]] = t["id"]
    tokens = [None] * (max(vocab.values()) + 1)
    for t, i in vocab.items():
        tokens[i] = t
    types = [(3 if added[t]["special"] else 4) if t in added else 1 for t in tokens]
    merges = [m if isinstance(m, str) else " ".join(m) for m in tj["model"]["merges"]]
    return {"tokens": tokens, "types": types, "merges": merges}


def _token_id(tokens: list[str], name: Any) -> int | None:
    name = name.get("content") if isinstance(name, dict) else name
    return tokens.index(name) if isinstance(name, str) and name in tokens else None


def _tensor(w: gguf.GGUFWriter, name: str, arr: np.ndarray, qtype) -> None:
    if arr.ndim == 1 or qtype == gguf.GGMLQuantizationType.F32:
        w.add_tensor(name, arr.astype(np.float32))
    elif qtype == gguf.GGMLQuantizationType.F16:
        w.add_tensor(name, arr.astype(np.float16))
    else:
        w.add_tensor(name, gguf.quants.quantize(arr.astype(np.float32), qtype), raw_dtype=qtype)


def _metadata(d: Path, hp: dict, pre: str | None) -> dict[str, Any]:
    tc = json.loads((d / "tokenizer_config.json").read_text())
    if (d / "spm_vocab.json").exists():
        v = json.loads((d / "spm_vocab.json").read_text())
        meta = {"tokenizer.ggml.model": "llama", "tokenizer.ggml.pre": "default",
                "tokenizer.ggml.scores": v["scores"]}  # fmt: skip
    else:
        v = _bpe_vocab(d)
        meta = {"tokenizer.ggml.model": "gpt2", "tokenizer.ggml.pre": pre,
                "tokenizer.ggml.merges": v["merges"]}  # fmt: skip
    tpl = tc.get("chat_template")
    if tpl is None and (d / "chat_template.jinja").exists():
        tpl = (d / "chat_template.jinja").read_text()
    tokens = v["tokens"]
    meta.update({
        "tokenizer.ggml.tokens": tokens, "tokenizer.ggml.token_type": v["types"],
        "tokenizer.ggml.bos_token_id": _token_id(tokens, tc.get("bos_token")),
        "tokenizer.ggml.eos_token_id": _token_id(tokens, tc.get("eos_token")),
        "tokenizer.ggml.unknown_token_id": _token_id(tokens, tc.get("unk_token")),
        "tokenizer.ggml.add_bos_token": tc.get("add_bos_token"),
        "tokenizer.chat_template": tpl,
    })  # fmt: skip
    return meta


_ADDERS = {
    "tokenizer.ggml.tokens": lambda w, v: w.add_token_list(v),
    "tokenizer.ggml.token_type": lambda w, v: w.add_token_types(v),
    "tokenizer.ggml.scores": lambda w, v: w.add_token_scores(v),
    "tokenizer.ggml.merges": lambda w, v: w.add_token_merges(v),
    "tokenizer.ggml.model": lambda w, v: w.add_tokenizer_model(v),
    "tokenizer.ggml.pre": lambda w, v: w.add_tokenizer_pre(v),
    "tokenizer.ggml.add_bos_token": lambda w, v: w.add_add_bos_token(bool(v)),
    "tokenizer.chat_template": lambda w, v: w.add_chat_template(v),
}


def _add(w: gguf.GGUFWriter, key: str, v: Any) -> None:
    if key in _ADDERS:
        _ADDERS[key](w, v)
    elif isinstance(v, bool):
        w.add_bool(key, v)
    elif isinstance(v, int):
        w.add_uint32(key, v)
    elif isinstance(v, float):
        w.add_float32(key, v)
    else:
        w.add_string(key, v)


def hf_to_gguf(
    d: Path,
    out: Path,
    *,
    pre: str | None = None,
    meta: dict[str, Any] | None = None,
    qtype=gguf.GGMLQuantizationType.F32,
    weights: dict[str, np.ndarray] | None = None,
    rope_freqs: bool = True,
    experts: int = 0,
) -> Path:
    """Write `out` from the HF directory `d`; `weights` replaces the safetensors tensors."""
    hp = json.loads((d / "config.json").read_text())
    H, K = hp["num_attention_heads"], hp.get("num_key_value_heads") or hp["num_attention_heads"]
    hd = hp.get("head_dim") or hp["hidden_size"] // H
    kv = {
        "llama.context_length": hp["max_position_embeddings"],
        "llama.embedding_length": hp["hidden_size"],
        "llama.block_count": hp["num_hidden_layers"],
        "llama.feed_forward_length": hp["intermediate_size"],
        "llama.attention.head_count": H,
        "llama.attention.head_count_kv": K,
        "llama.rope.freq_base": float(
            hp.get("rope_theta") or (hp.get("rope_parameters") or {}).get("rope_theta", 1e4)
        ),
        "llama.attention.layer_norm_rms_epsilon": float(hp["rms_norm_eps"]),
        "llama.rope.dimension_count": hd,
        "llama.vocab_size": hp["vocab_size"],
        **_metadata(d, hp, pre),
        **(meta or {}),
    }
    w = gguf.GGUFWriter(str(out), "llama")
    for key, v in kv.items():
        if v is not None:
            _add(w, key, v)
    t = weights if weights is not None else load_file(d / "model.safetensors")
    rs = hp.get("rope_scaling") or hp.get("rope_parameters") or {}
    if rope_freqs and rs.get("rope_type") == "llama3":
        w.add_tensor("rope_freqs.weight", llama3_rope_factors(hp))
    _tensor(w, "token_embd.weight", t["model.embed_tokens.weight"], qtype)
    for i in range(hp["num_hidden_layers"]):
        for hf_name, ours in _LAYER.items():
            a = t[f"model.layers.{i}.{hf_name}.weight"]
            if hf_name == "self_attn.q_proj":
                a = _permute(a, H)
            elif hf_name == "self_attn.k_proj":
                a = _permute(a, K)
            if experts and hf_name.startswith("mlp."):
                _tensor(w, f"blk.{i}.{ours}_exps.weight", np.stack([a] * experts), qtype)
                continue
            _tensor(w, f"blk.{i}.{ours}.weight", a, qtype)
        if experts:
            router = np.zeros((experts, hp["hidden_size"]), np.float32)
            _tensor(w, f"blk.{i}.ffn_gate_inp.weight", router, qtype)
    _tensor(w, "output_norm.weight", t["model.norm.weight"], qtype)
    if not hp.get("tie_word_embeddings", False):
        _tensor(w, "output.weight", t["lm_head.weight"], qtype)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return out
