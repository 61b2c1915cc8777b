"""The Markdown report and its plots render from a small synthetic results dict."""

from __future__ import annotations

import json

import numpy as np

from readme_jax.eval.report import headline_table, render_markdown, write_report
from readme_jax.eval.routing import expert_usage, layer_redundancy, temporal_locality


def _results(tmp_path) -> dict:
    metrics = tmp_path / "metrics.jsonl"
    recs = [{"step": s, "loss": 3.0 - 0.01 * s, "phase": "router" if s < 20 else "expert"}
            for s in range(40)]  # fmt: skip
    metrics.write_text("\n".join(json.dumps(r) for r in recs) + "\n")
    rng = np.random.default_rng(0)
    usage = expert_usage({"austen": rng.integers(0, 4, 500), "python": rng.integers(0, 4, 500)}, 4)
    lw = rng.integers(0, 4, (3, 1000))
    return {
        "meta": {"title": "tiny run", "checkpoint": "runs/tiny", "command": "make demo"},
        "models": {
            "dense": {
                "total_params": 134_515_008, "active_params": 134_515_008,
                "perplexity": {"austen": {"ppl": 21.234, "bpb": 1.2047},
                               "python": {"ppl": 9.871, "bpb": 0.8123}},
                "mmlu": {"0-shot": {"macro_acc": 0.2617, "micro_acc": 0.26, "n": 100,
                                    "per_subject": {"anatomy": {"acc": 0.3, "n": 50, "correct": 15},
                                                    "virology": {"acc": 0.2234, "n": 50,
                                                                 "correct": 11}}}},
                "decode_tok_s": 37.25,
            },
            "Read-ME": {
                "total_params": 150_000_000, "active_params": 99_000_000,
                "perplexity": {"austen": {"ppl": 24.567, "bpb": 1.31},
                               "python": {"ppl": 11.002, "bpb": 0.9}},
                "fidelity": {"austen": {"kl": 0.1234, "top1_agreement": 0.8123},
                             "python": {"kl": 0.0987, "top1_agreement": 0.85}},
                "decode_tok_s": 41.5,
            },
        },
        "routing": {
            "usage": usage.to_dict(),
            "locality": {"Read-ME": temporal_locality(np.array([0, 0, 1, 1, 1, 2])).to_dict()},
            "layerwise": layer_redundancy(lw, 4).to_dict(),
        },
        "serving": {
            "hit_ratio": {"belady": {2: 0.44, 3: 0.62, 5: 0.8803}, "lru": {"2": 0.34, "3": 0.52}},
            "latency": {"expert-aware": rng.gamma(2.0, 1.0, 50), "decode-first": [1.0, 2.0, 3.0]},
            "summary": {"expert-aware": {"unique experts / batch": 3.51}},
        },
        "training": {"metrics": str(metrics)},
    }  # fmt: skip


def test_report_renders_tables_and_all_plots(tmp_path):
    out = write_report(_results(tmp_path), tmp_path / "eval")
    plots = out["plots"]
    want = {"ppl_vs_active", "training", "routing_usage", "locality", "layer_mi", "hit_ratio",
            "latency_cdf"}  # fmt: skip
    assert set(plots) == want
    for p in plots.values():
        assert (
            p.is_file() and p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and p.stat().st_size > 5000
        )
    md = out["report"].read_text()
    for s in ["# tiny run", "21.23", "24.57", "11.00", "1.205", "0.1234", "81.2%", "26.2%",
              "37.2", "41.5", "99.0M", "134.5M", "88.0%", "C=5", "3.51", "virology", "22.3%",
              "(routing_usage.png)", "(training.png)", "(latency_cdf.png)"]:  # fmt: skip
        assert s in md, s
    # both models have perplexity, so the mean ppl of Read-ME is in the headline table
    assert f"{(24.567 + 11.002) / 2:.2f}" in headline_table(_results(tmp_path))
    saved = json.loads(out["results"].read_text())
    assert saved["models"]["Read-ME"]["fidelity"]["austen"]["kl"] == 0.1234
    assert saved["serving"]["hit_ratio"]["belady"]["5"] == 0.8803
    assert len(saved["serving"]["latency"]["expert-aware"]) == 50


def test_missing_sections_are_skipped_cleanly(tmp_path):
    results = {"models": {"dense": {"perplexity": {"austen": {"ppl": 20.0}}}}}
    out = write_report(results, tmp_path)
    assert out["plots"] == {}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["report.md", "results.json"]
    md = out["report"].read_text()
    header = headline_table(results).splitlines()[0]
    assert "mean ppl" in header
    for absent in ("MMLU", "decode tok/s", "KL", "active params", "bpb"):
        assert absent not in header
    assert "## Routing" not in md and "## Serving" not in md and "20.00" in md
    assert render_markdown({}).startswith("# ")


def test_skills_columns_and_text_only_means():
    """The answer test's columns, and headline means over the plain-text domains only (the
    generated chat domain has its own columns)."""
    answers = [{"id": "paris", "answer": "Paris | it is", "right": True},
               {"id": "blue", "answer": "", "right": False}]  # fmt: skip
    res = {
        "models": {
            "dense teacher": {
                "perplexity": {"fiction": {"ppl": 20.0}, "chat": {"ppl": 5.0}},
                "skills": {"answers": {"questions": 2, "right": 1, "empty": 0, "answers": answers}},
            },
            "Read-ME": {
                "perplexity": {
                    "fiction": {"ppl": 30.0}, "code": {"ppl": 10.0}, "chat": {"ppl": 9.0}
                },
                "skills": {
                    "chat": {"kl": 1.25, "top1_agreement": 0.5, "tokens": 10},
                    "answers": {"questions": 2, "right": 0, "empty": 1, "retention": 0.0,
                                "answers": answers},
                },
            },
        }
    }  # fmt: skip
    table = headline_table(res)
    rows = {line.split("|")[1].strip(): line for line in table.splitlines()[2:]}
    assert "| 20.00 |" in rows["dense teacher"] and "| 20.00 |" in rows["Read-ME"]  # (30+10)/2
    assert "1/2" in rows["dense teacher"] and "0/2" in rows["Read-ME"] and "0.0%" in rows["Read-ME"]
    assert "1.2500" in rows["Read-ME"]
    md = render_markdown(res)
    assert "## Skills: the answer test" in md and "(empty)" in md and "Paris \\| it is" in md
