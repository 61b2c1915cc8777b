"""The real default model (SmolLM2-135M-Instruct, f32): perplexity, cached decode, tokenizer."""

from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import readme_jax as rj
from readme_jax.decode.generator import dense_logits
from readme_jax.decode.steps import PromptError

pytestmark = pytest.mark.slow
AUSTEN = Path(__file__).parents[1] / "fixtures" / "corpus" / "austen" / "prideprejudice_ch000.txt"


@pytest.fixture(scope="module")
def model():
    return rj.load()


def test_config_matches_smollm2(model):
    c = model.cfg
    assert (c.n_layers, c.dim, c.ffn_dim, c.n_heads, c.n_kv_heads) == (30, 576, 1536, 9, 3)
    assert (c.vocab_size, c.rope_theta, c.tie_embeddings) == (49152, 100000.0, True)


def test_perplexity_on_austen_is_sane(model):
    ids = model.tokenizer.encode(AUSTEN.read_text())[:512]
    logits = model.logits([ids])
    lp = jax.nn.log_softmax(logits[0, :-1].astype(jnp.float32))
    nll = -jnp.take_along_axis(lp, jnp.asarray(ids[1:])[:, None], -1).mean()
    ppl = float(jnp.exp(nll))
    assert 12.0 < ppl < 40.0, ppl  # dense SmolLM2 gives ~20-30 on Austen; broken weights give >1000


def test_greedy_with_kv_cache_equals_full_reforward(model):
    """The cached decode's tokens are the full forward's greedy tokens. One forward of the prompt
    and the 12 generated tokens checks them all: the model is causal, so position i's logits are
    those of a re-forward of the first i + 1 tokens (greedy_by_reforward runs 12 forwards of the
    same program to the same argmaxes)."""
    ids = model.tokenizer.encode("The capital of France is")
    gen = model.generator().generate([ids], 12, eos_ids=[])[0]
    row = np.zeros((1, -(-(len(ids) + 12) // 16) * 16), np.int32)  # greedy_by_reforward's width
    row[0, : len(ids) + 12] = ids + gen
    logits = dense_logits(model.params, jnp.asarray(row), model.cfg)[0]
    assert gen == np.asarray(jnp.argmax(logits[len(ids) - 1 : len(ids) + 11], -1)).tolist()


def test_batched_generation_equals_single(model):
    a = model.tokenizer.encode("Once upon a time")
    b = model.tokenizer.encode("def fibonacci(n):\n    ")
    g = model.generator()
    both = g.generate([a, b], 8, eos_ids=[])
    assert both[0] == g.generate([a], 8, eos_ids=[])[0]
    assert both[1] == g.generate([b], 8, eos_ids=[])[0]


def test_chat_answer(model):
    out = model.generate("What is the capital of France?", chat=True, max_new_tokens=16)
    assert "Paris" in out


def test_tokenizer_round_trips_and_splits_digits(model):
    tok = model.tokenizer
    text = AUSTEN.read_text()[:3000] + "\nIn 1813, 12345 copies; naïve café — ok?"
    assert tok.decode(tok.encode(text)) == text
    digits = tok.encode("12345")
    assert len(digits) == 5 and tok.decode(digits[:1]) == "1"  # smollm pre-tokenizer
    chat = tok.apply_chat_template([{"role": "user", "content": "Hi"}])
    ids = tok.encode(chat)
    assert ids[0] == 1 and 2 in ids  # <|im_start|> / <|im_end|> are single special tokens


def test_prompt_longer_than_context_is_rejected(model):
    g = model.generator()
    with pytest.raises(PromptError, match="exceeds the model context"):
        g.generate([[5] * (model.cfg.max_seq_len - 3)], 10)


def test_out_of_range_token_ids_are_rejected(model):
    with pytest.raises(PromptError, match="outside the vocabulary"):
        model.logits([[1, 2, model.cfg.vocab_size]])
    with pytest.raises(PromptError, match="outside the vocabulary"):
        model.generator().generate([[1, -4]], 2)
