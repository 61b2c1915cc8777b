"""eval/compare: a run's summary fills training tokens (measured, else planned from the config),
the construction record, and paired intervals against the static pruned model, from a
results.json whose rows the real evaluation code wrote (tiny random Llamas on random tokens)."""

from __future__ import annotations

import json
import math

import jax
import numpy as np
import pytest

from readme_jax.checkpoints import models
from readme_jax.eval.compare import (
    CONTROL,
    CompareError,
    load_run,
    planned_train_tokens,
    write_comparison,
)
from readme_jax.eval.domains import evaluate_domains_many
from readme_jax.eval.perplexity import dense_logits_fn
from readme_jax.eval.pipeline import discover, snapshot_name
from readme_jax.model import llama
from readme_jax.model.config import LlamaConfig
from readme_jax.testing import tiny_readme

CFG = LlamaConfig(vocab_size=128, dim=32, n_layers=2, n_heads=4, n_kv_heads=2, ffn_dim=64,
                  max_seq_len=64)  # fmt: skip
SIZES = dict(rounds=2, router_steps=3, expert_steps=2, batch_size=4, router_batch_size=0)
PRESETS = {"compare": SIZES | {"seq_len": 16, "baselines": "layerwise,static"}}


@pytest.fixture(scope="module")
def eval_rows():
    """(teacher row, {model: row}) from evaluate_domains_many: the teacher itself as the
    trained model (better) and a sharpened copy as the static control (worse)."""
    p = jax.jit(llama.init_params, static_argnums=0)(CFG, jax.random.key(0))
    worse = jax.tree.map(lambda a: a * 3.0, p)
    rng = np.random.default_rng(0)
    streams = {d: (rng.integers(0, CFG.vocab_size, 80).astype(np.int32), None) for d in "ab"}
    f = dense_logits_fn(CFG)
    students = {"Read-ME (trained)": (f, p), CONTROL: (f, worse)}
    return evaluate_domains_many(
        (f, p), students, streams, max_length=16, batch_size=4, progress=False
    )


def _run(tmp_path, rows, *, summary=None, preset="compare", name="run"):
    run = tmp_path / name
    (run / "eval").mkdir(parents=True)
    t_row, m_rows = rows
    res = {"meta": {"notes": ["tiny"]}, "models": {"dense teacher": t_row, **m_rows}}
    for m in res["models"].values():
        m.update(active_params=1000, total_params=2000)
    (run / "eval" / "results.json").write_text(json.dumps(res))
    cfg = {"preset": preset, "refactor": {"remain_rate": 0.5}, "train": {"presets": PRESETS}}
    (run / "config.json").write_text(json.dumps(cfg))
    if summary is not None:
        (run / "train").mkdir()
        (run / "train" / "summary.json").write_text(json.dumps(summary))
    m = tiny_readme()
    models.save_readme(run / "moe_init", m.params, m.rc, m.spec, m.meta)
    return run


def test_paired_interval_against_the_static_control(tmp_path, eval_rows):
    r = load_run(_run(tmp_path, eval_rows))
    ci = r["models"]["Read-ME (trained)"]["ppl_ci"]
    rows = eval_rows[1]
    diff = np.concatenate(
        [
            np.subtract(
                rows["Read-ME (trained)"]["perplexity"][d]["window_nll"],
                rows[CONTROL]["perplexity"][d]["window_nll"],
            )  # fmt: skip
            for d in "ab"
        ]
    )
    assert ci["windows"] == len(diff) == 10 and ci["control"] == CONTROL
    mean, lo, hi = ci["nll_diff"]
    assert mean == pytest.approx(diff.mean()) and lo <= mean <= hi < 0  # the teacher is better
    assert ci["ppl_ratio"][0] == pytest.approx(math.exp(mean))
    assert r["models"][CONTROL]["ppl_ci"] is None
    assert r["models"]["dense teacher"]["ppl_ci"]["nll_diff"][0] == pytest.approx(mean)
    assert r["construction"] == {"checkpoint": "random:tiny"}


def test_train_tokens_measured_else_planned_from_the_config(tmp_path, eval_rows):
    summary = {"readme": {"router": {"tokens": 7}, "expert": {"tokens": 5}}, "peak": 1.0}
    measured = load_run(_run(tmp_path, eval_rows, summary=summary, name="a"))
    assert measured["train_tokens"] == {"readme": {"router": 7, "expert": 5}}
    planned = load_run(_run(tmp_path, eval_rows, summary={}, name="b"))  # an empty summary
    want = {"router": 2 * 3 * 4 * 16, "expert": 2 * 2 * 4 * 16}
    assert planned["train_tokens"] == {
        "readme": want,
        "layerwise": want,
        "static": {"expert": want["expert"]},
    }
    cfg = {"preset": "compare", "train": {"presets": PRESETS, "expert_steps": 0}}
    assert planned_train_tokens(cfg)["static"] == {}  # a command-line value wins over the preset


def test_old_results_without_window_nlls_give_no_interval(tmp_path, eval_rows):
    t_row, m_rows = json.loads(json.dumps(eval_rows))
    for row in [t_row, *m_rows.values()]:
        for d in row["perplexity"].values():
            del d["window_nll"], d["window_tokens"]
    r = load_run(_run(tmp_path, (t_row, m_rows)))
    assert all(m["ppl_ci"] is None for m in r["models"].values())
    assert r["models"]["Read-ME (trained)"]["ppl"] < r["models"][CONTROL]["ppl"]


def test_write_comparison_keeps_the_schema(tmp_path, eval_rows):
    runs = [load_run(_run(tmp_path, eval_rows))]
    text = write_comparison(runs, tmp_path / "out", "make compare")
    got = json.loads((tmp_path / "out" / "compare.json").read_text())
    assert got["command"] == "make compare" and len(got["runs"]) == 1
    keys = {"run", "remain_rate", "preset", "train_tokens", "construction", "control_run"}
    keys |= {"eval_note", "models", "curve"}
    assert set(got["runs"][0]) == keys
    assert {"active_params", "total_params", "ppl", "ppl_by_domain", "kl", "ppl_ci"} == set(
        got["runs"][0]["models"][CONTROL]
    )
    assert (tmp_path / "out" / "ppl_vs_active.png").stat().st_size > 0
    assert "beats (interval excludes 0)" in text and "ΔNLL vs static" in text
    assert not (tmp_path / "out" / "ppl_vs_tokens.png").exists()  # one token count: no curve


def test_snapshots_make_a_curve_paired_with_the_control_at_equal_tokens(tmp_path, eval_rows):
    """Snapshots (train.snapshots) named "<family> @ N expert tokens": each Read-ME point's
    interval is against the static model at the same count; the trained models stand for the
    run's own count; the untrained Read-ME for 0."""
    t_row, m_rows = json.loads(json.dumps(eval_rows))
    good, bad = m_rows["Read-ME (trained)"], m_rows[CONTROL]
    rows = {
        "Read-ME (before training)": bad,
        "Read-ME @ 64 expert tokens": {**bad, "expert_tokens": 64},
        "static pruned dense @ 64 expert tokens": {**good, "expert_tokens": 64},
        "Read-ME (trained)": good,
        CONTROL: bad,
    }
    summary = {"readme": {"expert": {"tokens": 128}}, "static": {"expert": {"tokens": 128}}}
    r = load_run(_run(tmp_path, (t_row, rows), summary=summary))
    curve = r["curve"]
    assert [p["expert_tokens"] for p in curve["Read-ME"]] == [0, 64, 128]
    assert [p["expert_tokens"] for p in curve[CONTROL]] == [64, 128]
    assert curve["Read-ME"][0]["ppl_ci"] is None  # no static model evaluated at 0 tokens
    at64, at128 = curve["Read-ME"][1]["ppl_ci"], curve["Read-ME"][2]["ppl_ci"]
    assert at64["nll_diff"][0] > 0 > at128["nll_diff"][0]  # worse at 64, better at 128
    assert at128 == r["models"]["Read-ME (trained)"]["ppl_ci"]
    assert r["models"]["Read-ME @ 64 expert tokens"]["ppl_ci"] is None  # not vs the final control
    text = write_comparison([r], tmp_path / "out", "cmd")
    assert (tmp_path / "out" / "ppl_vs_tokens.png").stat().st_size > 0
    assert "| 64 | " in text and "ppl_vs_tokens.png" in text


def test_a_run_without_a_static_model_borrows_one_at_equal_windows_and_tokens(tmp_path, eval_rows):
    t_row, m_rows = eval_rows
    summary = {"readme": {"expert": {"tokens": 64}}, "static": {"expert": {"tokens": 64}}}
    donor = _run(tmp_path, eval_rows, summary=summary, name="donor")
    alone = {"Read-ME (trained)": m_rows["Read-ME (trained)"]}
    run = _run(tmp_path, (t_row, alone), summary={"readme": summary["readme"]}, name="alone")
    assert load_run(run)["models"]["Read-ME (trained)"]["ppl_ci"] is None  # no control of its own
    r = load_run(run, control_run=donor)
    assert r["control_run"] == str(donor)
    assert (
        r["models"]["Read-ME (trained)"]["ppl_ci"]
        == load_run(donor)["models"]["Read-ME (trained)"]["ppl_ci"]
    )  # the same interval as inside the donor run
    text = write_comparison([r], tmp_path / "out", "cmd")
    assert f"borrowed from `{donor}`" in text and "beats (interval excludes 0)" in text
    # a run with its own control keeps it
    assert load_run(donor, control_run=run)["control_run"] is None
    # other windows: the teacher's per-window NLLs differ
    t_other = json.loads(json.dumps(t_row))
    t_other["perplexity"]["a"]["window_nll"][0] += 0.5
    other = _run(tmp_path, (t_other, alone), summary={"readme": summary["readme"]}, name="w")
    with pytest.raises(CompareError, match="different held-out windows"):
        load_run(other, control_run=donor)
    # other token counts
    more = {"readme": {"expert": {"tokens": 128}}}
    longer = _run(tmp_path, (t_row, alone), summary=more, name="t")
    with pytest.raises(CompareError, match="not a comparison at equal tokens"):
        load_run(longer, control_run=donor)
    with pytest.raises(CompareError, match="has no 'static pruned dense'"):
        load_run(run, control_run=longer)


def test_a_run_without_evaluation_is_a_user_error(tmp_path):
    (tmp_path / "r").mkdir()
    with pytest.raises(CompareError, match="eval stages"):
        load_run(tmp_path / "r")


def test_the_eval_stage_finds_snapshots_after_the_run_models_by_model_and_tokens(tmp_path):
    snaps = ["snapshots/" + n for n in ("moe_trained_640", "moe_trained_64", "baseline_static_0")]
    for d in ["moe_trained", "moe_init", "baseline_static", *snaps, "snapshots/other_5"]:
        (tmp_path / d).mkdir(parents=True)
        (tmp_path / d / "model.json").write_text("{}")
    got = [str(p.relative_to(tmp_path)) for p in discover(tmp_path)]
    assert got == ["moe_init", "moe_trained", "baseline_static", "snapshots/baseline_static_0",
                   "snapshots/moe_trained_64", "snapshots/moe_trained_640"]  # fmt: skip
    assert snapshot_name(tmp_path / "snapshots/moe_trained_64") == "Read-ME @ 64 expert tokens"
    assert snapshot_name(tmp_path / "moe_trained") is None
    assert [p.name for p in discover(tmp_path, ("snapshots",))][-1] == "baseline_static"
