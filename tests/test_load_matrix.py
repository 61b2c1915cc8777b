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
import os
import subprocess
import sys
import time
from pathlib import Path

import gguf
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from gguf_convert import hf_to_gguf
from safetensors.numpy import load_file

from readme_jax.checkpoints.gguf import load_gguf
from readme_jax.checkpoints.hf import load_hf
from readme_jax.checkpoints.tokenizer import load_tokenizer
from readme_jax.model.llama import forward

ROOT = Path(__file__).resolve().parent.parent
FIXTURES = Path(__file__).resolve().parent / "fixtures"
STYLES = ["llama2", "llama3", "smollm2", "mistral"]
PRE = {"llama3": "llama-bpe", "smollm2": "smollm"}  # what llama.cpp's converter writes for them
ATOL = 1e-4
CHAT = [{"role": "user", "content": "Hi there, 12345!"}]
_forward = jax.jit(forward, static_argnames=("cfg",))


def fixture(style: str) -> Path:
    return FIXTURES / f"load_{style}"


def golden(style: str) -> dict:
    return json.loads((fixture(style) / "golden.json").read_text())


@pytest.fixture(scope="session")
def ggufs(tmp_path_factory) -> dict[str, Path]:
    out = tmp_path_factory.mktemp("gguf")
    return {s: hf_to_gguf(fixture(s), out / f"{s}.gguf", pre=PRE.get(s)) for s in STYLES}


def logits_of(cfg, params, tokens_BxS) -> np.ndarray:
    return np.asarray(_forward(params, jnp.asarray(tokens_BxS), cfg)[0], np.float32)


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


def _peer_python() -> str | None:
    for cand in (os.environ.get("READMEJAX_PEER_PYTHON"), str(ROOT / ".venv-peer/bin/python"),
                 "/work/main/.venv-peer/bin/python", sys.executable):  # fmt: skip
        if cand and Path(cand).exists():
            ok = subprocess.run([cand, "-c", "import torch, transformers"], capture_output=True)
            if ok.returncode == 0:
                return cand
    return None


_PEER = """
import sys, numpy as np, torch
from transformers import AutoModelForCausalLM
m = AutoModelForCausalLM.from_pretrained(sys.argv[1], dtype=torch.float32,
                                         attn_implementation="eager").eval()
with torch.no_grad():
    out = m(input_ids=torch.from_numpy(np.load(sys.argv[2]).astype(np.int64)), use_cache=False)
np.save(sys.argv[3], out.logits.float().numpy())
"""


@pytest.mark.torch
@pytest.mark.parametrize("style", STYLES)
def test_live_peer_on_fresh_tokens(style, ggufs, tmp_path):
    python = _peer_python()
    if python is None:
        pytest.skip("no Python with torch + transformers (make peer)")
    cfg, params = load_hf(fixture(style))
    seed = time.time_ns() % 2**32
    tokens = np.random.default_rng(seed).integers(0, cfg.vocab_size, (2, 33), dtype=np.int32)
    np.save(tmp_path / "t.npy", tokens)
    cmd = [
        python,
        "-c",
        _PEER,
        str(fixture(style)),
        str(tmp_path / "t.npy"),
        str(tmp_path / "l.npy"),
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    peer = np.load(tmp_path / "l.npy")
    gcfg, gparams = load_gguf(ggufs[style])
    for c, p in ((cfg, params), (gcfg, gparams)):
        diff = np.abs(logits_of(c, p, tokens) - peer).max()
        assert diff < ATOL, f"max |ours - peer| = {diff} (token seed {seed})"
