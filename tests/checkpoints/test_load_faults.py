"""One test (or more) per loading fault, each on a checkpoint written as its ecosystem
writes it (tests/gguf_convert.py for GGUF, the committed HF fixtures in tests/fixtures/load_*).

Reference values: PyTorch logits and runtime token ids committed by tools/make_load_fixtures.py.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from gguf_convert import hf_to_gguf
from load_fixtures import ATOL, fixture, golden, logits_of
from safetensors.numpy import load_file

import readme_jax as rj
from readme_jax.checkpoints.errors import CheckpointError, TextError
from readme_jax.checkpoints.gguf import load_gguf
from readme_jax.checkpoints.hf import load_hf
from readme_jax.checkpoints.tokenizer import load_tokenizer
from readme_jax.model.config import ConfigError
from readme_jax.model.sampling import SamplingParams, sample
from readme_jax.serve.model import serve_model
from readme_jax.testing import tiny_readme

ROOT = Path(__file__).resolve().parents[2]


def _hf_copy(style: str, tmp_path: Path, **config) -> Path:
    d = tmp_path / style
    shutil.copytree(fixture(style), d)
    c = json.loads((d / "config.json").read_text())
    c.update(config)
    (d / "config.json").write_text(json.dumps(c))
    return d


def _rope(kind: str, **kw) -> dict:
    return {"rope_parameters": {"rope_type": kind, "rope_theta": 10000.0, **kw}}


# --- 1. RoPE scaling -------------------------------------------------------------------------


def test_gguf_rope_freqs_are_applied(tmp_path):
    d = fixture("llama3")
    tokens, ref = np.load(d / "tokens.npy"), np.load(d / "logits.npy")
    cfg, params = load_gguf(hf_to_gguf(d, tmp_path / "a.gguf", pre="llama-bpe"))
    assert cfg.rope_scaling is not None and cfg.rope_scaling.rope_type == "freq_factors"
    np.testing.assert_allclose(logits_of(cfg, params, tokens), ref, atol=ATOL)
    plain = load_gguf(hf_to_gguf(d, tmp_path / "b.gguf", pre="llama-bpe", rope_freqs=False))
    assert np.abs(logits_of(*plain, tokens) - ref).max() > 100 * ATOL  # the tensor matters


def test_hf_linear_rope_scaling_matches_pytorch(tmp_path):
    d = _hf_copy("llama2", tmp_path, **_rope("linear", factor=4.0))
    cfg, params = load_hf(d)
    got = logits_of(cfg, params, np.load(d / "tokens.npy"))
    np.testing.assert_allclose(got, np.load(d / "logits_linear.npy"), atol=ATOL)
    assert np.abs(got - np.load(d / "logits.npy")).max() > 100 * ATOL


def test_gguf_linear_rope_scaling_matches_pytorch(tmp_path):
    d = fixture("llama2")
    meta = {"llama.rope.scaling.type": "linear", "llama.rope.scaling.factor": 4.0}
    cfg, params = load_gguf(hf_to_gguf(d, tmp_path / "lin.gguf", meta=meta))
    got = logits_of(cfg, params, np.load(d / "tokens.npy"))
    np.testing.assert_allclose(got, np.load(d / "logits_linear.npy"), atol=ATOL)


def test_hf_dynamic_rope_is_plain_rope_within_the_context(tmp_path):
    # transformers' dynamic NTK only rescales past max_position_embeddings.
    d = _hf_copy("llama2", tmp_path, **_rope("dynamic", factor=2.0))
    cfg, params = load_hf(d)
    assert cfg.max_seq_len == 256
    np.testing.assert_allclose(
        logits_of(cfg, params, np.load(d / "tokens.npy")), np.load(d / "logits.npy"), atol=ATOL
    )


@pytest.mark.parametrize("kind", ["yarn", "longrope"])
def test_hf_unsupported_rope_scaling_is_refused_by_name(kind, tmp_path):
    d = _hf_copy("llama2", tmp_path, **_rope(kind, factor=4.0, original_max_position_embeddings=64))
    with pytest.raises(ConfigError, match=kind):
        load_hf(d)


def test_gguf_unsupported_rope_scaling_is_refused_by_name(tmp_path):
    meta = {"llama.rope.scaling.type": "yarn", "llama.rope.scaling.factor": 4.0}
    path = hf_to_gguf(fixture("llama2"), tmp_path / "yarn.gguf", meta=meta)
    with pytest.raises(ConfigError, match="'yarn'"):
        load_gguf(path)


def test_gguf_rope_freqs_with_linear_scaling_is_refused(tmp_path):
    meta = {"llama.rope.scaling.type": "linear", "llama.rope.scaling.factor": 2.0}
    path = hf_to_gguf(fixture("llama3"), tmp_path / "both.gguf", pre="llama-bpe", meta=meta)
    with pytest.raises(ConfigError, match="both rope_freqs.weight and linear"):
        load_gguf(path)


@pytest.mark.parametrize(
    "experts,meta,named",
    [
        (4, {"llama.expert_count": 4, "llama.expert_used_count": 2}, "expert_count = 4"),
        (4, {}, "'blk.0.ffn_gate_exps.weight'"),  # expert tensors, no expert metadata
        (0, {"llama.expert_count": 8}, "expert_count = 8"),  # metadata only
    ],
)
def test_gguf_moe_is_refused_as_moe_not_as_a_damaged_file(experts, meta, named, tmp_path):
    path = hf_to_gguf(fixture("llama2"), tmp_path / "moe.gguf", meta=meta, experts=experts)
    for load in (load_gguf, rj.load):
        with pytest.raises(ConfigError, match="GGUF MoE checkpoints are not supported") as e:
            load(path)
        assert named in str(e.value) and "['llama']" in str(e.value)
        assert "missing" not in str(e.value)


# --- 2. pre-tokenizers and SentencePiece GGUFs -----------------------------------------------


def _pieces(tok, text: str) -> list[str]:
    return [p for p, _ in tok._tok.pre_tokenizer.pre_tokenize_str(text)]


def test_llama_bpe_splits_digits_by_three_and_keeps_contractions(tmp_path):
    tok = load_tokenizer(hf_to_gguf(fixture("llama3"), tmp_path / "l3.gguf", pre="llama-bpe"))
    assert _pieces(tok, "12345") == ["123", "45"]
    assert "'S" in _pieces(tok, "IT'S")
    text = "Hello world! 12345 and 3.14159"
    assert tok.encode(text) == golden("llama3")["probes"][text]["hf"]


def test_gpt2_and_default_pre_tokenizers_follow_llama_cpp(tmp_path):
    d = fixture("llama3")
    gpt2 = load_tokenizer(hf_to_gguf(d, tmp_path / "g.gguf", pre="gpt-2"))
    assert _pieces(gpt2, "12345 IT'S") == ["12345", "ĠIT", "'", "S"]
    default = load_tokenizer(hf_to_gguf(d, tmp_path / "d.gguf", pre="default"))
    assert _pieces(default, "12345") == ["123", "45"]  # llama.cpp's [0-9][0-9][0-9] pass
    absent = load_tokenizer(hf_to_gguf(d, tmp_path / "n.gguf", meta={"tokenizer.ggml.pre": None}))
    assert _pieces(absent, "a+b 12345") == _pieces(default, "a+b 12345")


def test_unknown_pre_tokenizer_is_refused_by_name(tmp_path):
    path = hf_to_gguf(fixture("llama3"), tmp_path / "q.gguf", pre="qwen2")
    with pytest.raises(CheckpointError, match="'qwen2'"):
        load_tokenizer(path)


def test_unknown_gguf_tokenizer_model_is_refused_by_name(tmp_path):
    meta = {"tokenizer.ggml.model": "bert"}
    path = hf_to_gguf(fixture("llama3"), tmp_path / "b.gguf", pre="llama-bpe", meta=meta)
    with pytest.raises(CheckpointError, match="'bert'"):
        load_tokenizer(path)


def test_sentencepiece_gguf_loads_and_tokenizes_like_sentencepiece(tmp_path):
    tok = load_tokenizer(hf_to_gguf(fixture("llama2"), tmp_path / "spm.gguf"))
    for text, ids in golden("llama2")["probes"].items():
        assert tok.encode(text) == ids["sentencepiece"], text
    text = "café naïve 東京 🙂"
    assert tok.decode(tok.encode(text), skip_special=True) == text  # byte fallback round trip


# --- 3. BOS ----------------------------------------------------------------------------------


def test_hf_post_processor_bos_is_kept():
    tok = load_tokenizer(fixture("llama3"))
    ids = tok.encode("hello")
    assert ids[0] == tok.bos_id and ids == golden("llama3")["probes"]["hello"]["hf"]


def test_chat_template_writing_bos_gives_exactly_one(tmp_path):
    for tok in (load_tokenizer(fixture("llama3")),
                load_tokenizer(hf_to_gguf(fixture("llama3"), tmp_path / "a.gguf",
                                          pre="llama-bpe"))):  # fmt: skip
        assert tok.apply_chat_template([{"role": "user", "content": "x"}]).startswith(
            "<|begin_of_text|>"
        )
        ids = tok.encode_chat([{"role": "user", "content": "x"}])
        assert ids.count(tok.bos_id) == 1 and ids[0] == tok.bos_id


# --- 4. end tokens ---------------------------------------------------------------------------


def _always_im_end(tmp_path: Path) -> Path:
    """A SmolLM2-style GGUF whose greedy choice is always <|im_end|> (id 2) and whose declared
    eos is <|endoftext|> (id 0): attention and MLP outputs zeroed, so the final hidden state is
    the input embedding; dimension 0 of every embedding is positive, the final norm keeps only
    that dimension, and <|im_end|>'s (tied) embedding row is largest there."""
    t = dict(load_file(fixture("smollm2") / "model.safetensors"))
    for k in list(t):
        if k.endswith(("o_proj.weight", "down_proj.weight")):
            t[k] = np.zeros_like(t[k])
    e = t["model.embed_tokens.weight"].copy()
    e[:, 0] = 10.0
    e[2, 0] = 20.0
    t["model.embed_tokens.weight"] = e
    norm = np.zeros_like(t["model.norm.weight"])
    norm[0] = 1.0
    t["model.norm.weight"] = norm
    meta = {"tokenizer.ggml.eos_token_id": 0}
    return hf_to_gguf(fixture("smollm2"), tmp_path / "m", pre="smollm", meta=meta, weights=t)


def test_generation_stops_at_every_declared_end_token(tmp_path):
    m = rj.load(_always_im_end(tmp_path))  # no .gguf suffix: detected by its magic
    assert {0, 2} <= set(m.cfg.eos_ids)
    assert m.generate("hello", chat=True, max_new_tokens=5) == ""
    full = m.generator().generate([m.tokenizer.encode("hi")], 5, SamplingParams(),
                                  include_eos=True)  # fmt: skip
    assert full[0] == [2]


def test_gguf_tokenizer_is_cached_on_disk_and_a_torn_cache_is_rebuilt(tmp_path, monkeypatch):
    from readme_jax.checkpoints import tokenizer as tk

    monkeypatch.setenv("READMEJAX_CACHE_DIR", str(tmp_path / "cache"))
    path = hf_to_gguf(fixture("smollm2"), tmp_path / "c.gguf", pre="smollm")
    texts = ["Hello world, 1234 tokens!", "  spaces\n\ttabs <|im_end|> and ünïcode"]
    msgs = [{"role": "user", "content": "hi"}]

    def fresh():  # a new process: nothing cached in memory
        tk._cached_gguf_tokenizer.cache_clear()
        return load_tokenizer(path)

    parsed = fresh()
    (entry,) = (tmp_path / "cache" / "tokenizers").glob("*.json")
    cached = fresh()
    assert cached is not parsed and cached.name == parsed.name
    for a in ("bos_id", "eos_ids", "add_bos_default", "chat_template", "special_tokens"):
        assert getattr(cached, a) == getattr(parsed, a), a
    for t in texts:
        assert cached.encode(t) == parsed.encode(t)
        assert cached.decode(parsed.encode(t)) == parsed.decode(parsed.encode(t))
    assert cached.encode_chat(msgs) == parsed.encode_chat(msgs)
    entry.write_text(entry.read_text()[:100])  # torn: rebuilt from the GGUF, then rewritten
    assert fresh().encode(texts[0]) == parsed.encode(texts[0])
    assert len(entry.read_text()) > 100
    # a change to the code that builds tokenizers keys a new entry (the old one is not used)
    monkeypatch.setattr(tk, "_builder_source_hash", lambda: "edited")
    fresh()
    assert len(list((tmp_path / "cache" / "tokenizers").glob("*.json"))) == 2
    monkeypatch.setenv("READMEJAX_CACHE_DIR", "off")
    entry.unlink()
    fresh()
    assert not entry.exists()


def test_serving_engine_config_gets_every_end_token(tmp_path):
    m = tiny_readme(vocab=420)  # saved with eos_ids (2,), as older conversions were
    tok = load_tokenizer(hf_to_gguf(fixture("smollm2"), tmp_path / "t.gguf", pre="smollm"))
    assert set(serve_model(m, tok, "test").params.rc.model.eos_ids) == {0, 2}


def test_hf_generation_config_end_tokens_are_kept(tmp_path):
    d = _hf_copy("smollm2", tmp_path)
    (d / "generation_config.json").write_text(json.dumps({"eos_token_id": [2, 0]}))
    cfg, _ = load_hf(d)
    assert set(cfg.eos_ids) == {0, 2} and set(load_tokenizer(d).eos_ids) == {0, 2}


def test_gguf_eot_and_eom_ids_are_end_tokens(tmp_path):
    meta = {"tokenizer.ggml.eot_token_id": 7, "tokenizer.ggml.eom_token_id": 9}
    cfg, _ = load_gguf(hf_to_gguf(fixture("llama2"), tmp_path / "e.gguf", meta=meta))
    assert cfg.eos_ids[0] == 2 and {7, 9} <= set(cfg.eos_ids)


# --- 5. chat templates -----------------------------------------------------------------------

CHATML_NO_SYSTEM = (
    "{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n' + message['content']"
    " + '<|im_end|>' + '\n'}}{% endfor %}{% if add_generation_prompt %}"
    "{{ '<|im_start|>assistant\n' }}{% endif %}"
)


def test_gguf_template_is_rendered_as_stored(tmp_path):
    meta = {"tokenizer.chat_template": CHATML_NO_SYSTEM}
    tok = load_tokenizer(hf_to_gguf(fixture("smollm2"), tmp_path / "c", pre="smollm", meta=meta))
    out = tok.apply_chat_template([{"role": "user", "content": "hi"}])
    assert out == "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"  # no SmolLM system


def test_gguf_non_chatml_template_is_used(tmp_path):
    tok = load_tokenizer(hf_to_gguf(fixture("mistral"), tmp_path / "m.gguf"))
    assert tok.apply_chat_template([{"role": "user", "content": "hi"}]) == "<s>[INST] hi [/INST]"
    with pytest.raises(TextError, match="alternate"):  # the template's raise_exception
        tok.apply_chat_template([{"role": "assistant", "content": "hi"}])


def test_templates_run_sandboxed(tmp_path):
    meta = {"tokenizer.chat_template": "{{ messages.__class__.__mro__[1].__subclasses__() }}"}
    tok = load_tokenizer(hf_to_gguf(fixture("smollm2"), tmp_path / "s", pre="smollm", meta=meta))
    with pytest.raises(TextError):
        tok.apply_chat_template([{"role": "user", "content": "hi"}])


def test_no_template_is_a_clear_error(tmp_path):
    meta = {"tokenizer.chat_template": None}
    tok = load_tokenizer(hf_to_gguf(fixture("smollm2"), tmp_path / "n", pre="smollm", meta=meta))
    with pytest.raises(TextError, match="no chat template"):
        tok.encode_chat([{"role": "user", "content": "hi"}])


# --- 6. sampling values ----------------------------------------------------------------------


@pytest.mark.parametrize(
    "kw", [dict(temperature=float("nan")), dict(temperature=float("inf")),
           dict(top_p=float("nan")), dict(top_p=float("inf")), dict(temperature=-1.0)],
)  # fmt: skip
def test_non_finite_sampling_values_are_refused(kw):
    with pytest.raises(ValueError):
        SamplingParams(**kw)


@pytest.mark.parametrize("t", [3e-38, 1e-30, 1e-8])
def test_tiny_temperature_samples_the_argmax(t):
    logits = jax.random.normal(jax.random.key(0), (8, 1000)) * 10
    out = sample(logits, jax.random.key(1), jnp.full((8,), t), jnp.zeros((8,), jnp.int32),
                 jnp.ones((8,)))  # fmt: skip
    np.testing.assert_array_equal(out, jnp.argmax(logits, -1))


def test_generate_takes_a_seed(tmp_path):
    m = rj.load(hf_to_gguf(fixture("llama3"), tmp_path / "s.gguf", pre="llama-bpe"))
    outs = [m.generate("hello", max_new_tokens=12, temperature=1.0, seed=s) for s in (0, 1, 0)]
    assert outs[0] != outs[1] and outs[0] == outs[2]


# --- 7. errors -------------------------------------------------------------------------------


def test_gguf_without_merges_names_the_problem(tmp_path):
    meta = {"tokenizer.ggml.merges": None}
    path = hf_to_gguf(fixture("smollm2"), tmp_path / "x.gguf", pre="smollm", meta=meta)
    with pytest.raises(CheckpointError, match="tokenizer.ggml.merges"):
        load_tokenizer(path)


def test_hf_directory_without_tokenizer_files(tmp_path):
    d = _hf_copy("llama3", tmp_path)
    for f in ("tokenizer.json", "tokenizer_config.json"):
        (d / f).unlink()
    with pytest.raises(CheckpointError, match="no tokenizer files") as e:
        rj.load(d)
    assert "sentencepiece" not in str(e.value)


def test_interrupted_readme_save_is_named(tmp_path):
    (tmp_path / "run" / "params").mkdir(parents=True)
    with pytest.raises(CheckpointError, match="an interrupted save"):
        rj.load(tmp_path / "run")


def _cli(*args, cwd=ROOT) -> subprocess.CompletedProcess:
    cmd = [sys.executable, str(ROOT / "launch" / "generate.py"), "--max_new_tokens", "3", *args]
    path = os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH")) if p)
    env = {**os.environ, "PYTHONPATH": path}  # this checkout's readme_jax
    return subprocess.run(cmd, capture_output=True, timeout=600, cwd=cwd, env=env)


def test_cli_user_errors_print_one_line(tmp_path):
    gguf = hf_to_gguf(fixture("smollm2"), tmp_path / "s.gguf", pre="smollm",
                      meta={"tokenizer.chat_template": None})  # fmt: skip
    trunc = tmp_path / "t.gguf"
    trunc.write_bytes(gguf.read_bytes()[:3000])
    cases = [
        ([b"--checkpoint", str(tmp_path / "missing").encode(), b"--prompt", b"x"], b"not found"),
        ([b"--checkpoint", str(trunc).encode(), b"--prompt", b"x"], b"truncated"),
        ([b"--checkpoint", str(gguf).encode(), b"--prompt", b"x", b"--chat"], b"no chat template"),
        ([b"--checkpoint", str(gguf).encode(), b"--prompt", b"caf\xe9"], b"not valid UTF-8"),
    ]
    for args, want in cases:
        r = _cli(*args)
        err = r.stderr.strip().splitlines()
        assert r.returncode == 1 and b"Traceback" not in r.stderr, r.stderr[-2000:]
        assert want in err[-1] and err[-1].startswith(b"error: "), r.stderr[-2000:]


def test_cli_stops_at_the_end_of_turn(tmp_path):
    r = _cli("--checkpoint", str(_always_im_end(tmp_path)), "--prompt", "hello", "--chat")
    assert r.returncode == 0, r.stderr[-2000:]
    assert r.stdout.strip() == b"" and b"0 generated" in r.stderr
