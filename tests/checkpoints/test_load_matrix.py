"""The checkpoint matrix: four Llama-family styles, each as an HF directory and as a GGUF.

Fixtures (tests/fixtures/load_<style>, built by tools/make_load_fixtures.py in the peer venv)
hold HF directories as transformers writes them, the PyTorch logits of fixed tokens, and token
ids from the tokenizer's own runtime (transformers' AutoTokenizer; SentencePiece itself for the
SentencePiece styles). The GGUF of each is written here by tests/gguf_convert.py, following
llama.cpp's converter (tensor names, q/k permutation, rope_freqs.weight, vocabulary metadata).
The `torch`-marked test reruns the PyTorch peer on fresh tokens when a torch Python exists.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import gguf
import numpy as np
import pytest
from gguf_convert import hf_to_gguf
from load_fixtures import ATOL, fixture, golden, logits_of
from peer import peer_logits_many
from safetensors.numpy import load_file

from readme_jax.checkpoints.gguf import load_gguf
from readme_jax.checkpoints.hf import load_hf
from readme_jax.checkpoints.tokenizer import load_tokenizer

ROOT = Path(__file__).resolve().parents[2]
STYLES = ["llama2", "llama3", "smollm2", "mistral"]
PRE = {"llama3": "llama-bpe", "smollm2": "smollm"}  # what llama.cpp's converter writes for them
CHAT = [{"role": "user", "content": "Hi there, 12345!"}]


@pytest.fixture(scope="session")
def ggufs(tmp_path_factory) -> dict[str, Path]:
    out = tmp_path_factory.mktemp("gguf")
    return {s: hf_to_gguf(fixture(s), out / f"{s}.gguf", pre=PRE.get(s)) for s in STYLES}


@pytest.mark.parametrize("kind", ["hf", "gguf"])
@pytest.mark.parametrize("style", STYLES)
def test_logits_match_pytorch(style, kind, ggufs):
    d = fixture(style)
    cfg, params = load_hf(d) if kind == "hf" else load_gguf(ggufs[style])
    ref = np.load(d / "logits.npy")
    np.testing.assert_allclose(logits_of(cfg, params, np.load(d / "tokens.npy")), ref, atol=ATOL)


@pytest.mark.parametrize("qtype", [gguf.GGMLQuantizationType.F16, gguf.GGMLQuantizationType.Q8_0])
def test_quantized_gguf_equals_its_dequantized_weights(qtype, tmp_path):
    # The exact reference for a quantized file: the same model with each weight replaced by
    # gguf.quants' round trip, written as F32. Then the PyTorch logits, loosely.
    d = fixture("llama3")
    cfg, params = load_gguf(hf_to_gguf(d, tmp_path / "q.gguf", pre="llama-bpe", qtype=qtype))
    rt = {
        k: gguf.quants.dequantize(gguf.quants.quantize(w, qtype), qtype) if w.ndim == 2 else w
        for k, w in load_file(d / "model.safetensors").items()
    }
    ref = load_gguf(hf_to_gguf(d, tmp_path / "rt.gguf", pre="llama-bpe", weights=rt))
    tokens = np.load(d / "tokens.npy")
    ours = logits_of(cfg, params, tokens)
    np.testing.assert_allclose(ours, logits_of(*ref, tokens), atol=ATOL)
    assert 0 < np.abs(ours - np.load(d / "logits.npy")).max() < 0.5


@pytest.mark.parametrize("kind", ["hf", "gguf"])
@pytest.mark.parametrize("style", STYLES)
def test_plain_text_ids_match_the_runtime(style, kind, ggufs):
    tok = load_tokenizer(fixture(style) if kind == "hf" else ggufs[style])
    for text, ids in golden(style)["probes"].items():
        # GGUF SentencePiece vocabularies follow SentencePiece (as llama.cpp does); transformers'
        # legacy Llama tokenizer differs from it on leading spaces.
        want = ids.get("sentencepiece", ids["hf"]) if kind == "gguf" else ids["hf"]
        assert tok.encode(text) == want, text


@pytest.mark.parametrize("kind", ["hf", "gguf"])
@pytest.mark.parametrize("style", STYLES)
def test_chat_prompt_ids_match_the_runtime(style, kind, ggufs):
    tok = load_tokenizer(fixture(style) if kind == "hf" else ggufs[style])
    want = golden(style)["chat" if kind == "hf" else "chat_llama_cpp"]
    ids = tok.encode_chat(CHAT)
    assert ids == want
    if tok.bos_id is not None and style != "smollm2":  # ChatML writes no BOS
        assert ids.count(tok.bos_id) == 1 and ids[0] == tok.bos_id


@pytest.mark.parametrize("kind", ["hf", "gguf"])
def test_every_declared_end_token_is_kept(kind, ggufs):
    d = fixture("llama3")
    cfg = load_hf(d)[0] if kind == "hf" else load_gguf(ggufs["llama3"])[0]
    tok = load_tokenizer(d if kind == "hf" else ggufs["llama3"])
    t = json.loads((d / "tokenizer.json").read_text())
    ids = {a["content"]: a["id"] for a in t["added_tokens"]}
    ends = {ids["<|end_of_text|>"], ids["<|eom_id|>"], ids["<|eot_id|>"]}
    assert set(cfg.eos_ids) == ends == set(tok.eos_ids)


# --- live comparison against the PyTorch peer ------------------------------------------------


@pytest.fixture(scope="module")
def live(tmp_path_factory):
    """Every style's HF fixture on fresh random tokens through one peer process
    (tests/peer.py), with our HF-loaded model beside it."""
    seed = time.time_ns() % 2**32
    rng = np.random.default_rng(seed)
    jobs, ours = [], {}
    for style in STYLES:
        cfg, params = load_hf(fixture(style))
        tokens = rng.integers(0, cfg.vocab_size, (2, 33), dtype=np.int32)
        jobs.append((fixture(style), tokens))
        ours[style] = (cfg, params, tokens)
    peer = peer_logits_many(jobs, tmp_path_factory.mktemp("peer"))
    return {k: (*v, p) for (k, v), p in zip(ours.items(), peer, strict=True)}, seed


@pytest.mark.torch
@pytest.mark.parametrize("style", STYLES)
def test_live_peer_on_fresh_tokens(style, ggufs, live):
    runs, seed = live
    cfg, params, tokens, peer = runs[style]
    gcfg, gparams = load_gguf(ggufs[style])
    for c, p in ((cfg, params), (gcfg, gparams)):
        diff = np.abs(logits_of(c, p, tokens) - peer).max()
        assert diff < ATOL, f"max |ours - peer| = {diff} (token seed {seed})"
