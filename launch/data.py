"""Fetch and prepare the text domains and MMLU; print and save a table of documents and tokens.

Examples:
  python launch/data.py                                   # the four default domains + MMLU
  python launch/data.py --domains=fiction,legal=/data/legal.jsonl --tasks=
  python launch/data.py --bench_batches=2000              # also time the grain pipeline

Everything lands in --cache (default $READEME_CACHE or ~/.cache/readme_jax) and is reused on the
next run. A domain that cannot be fetched is reported with instructions; the others still work.
"""

from __future__ import annotations

import dataclasses
import json
import sys
import time
from pathlib import Path

from absl import app, flags
from tqdm.auto import tqdm

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from readme_jax.data import corpora, fetch, pipeline, tasks  # noqa: E402

_CACHE = flags.DEFINE_string("cache", None, "Cache directory (default $READEME_CACHE or ~/.cache).")
_DOMAINS = flags.DEFINE_list(
    "domains",
    list(corpora.DEFAULT_DOMAINS),
    "Domains to prepare: default names, or name=PATH for a folder of .txt, a .jsonl with a "
    "'text' field, or a .parquet with a 'text' column.",
)
_SEED = flags.DEFINE_integer("split_seed", 0, "Seed that assigns documents to splits.")
_VAL = flags.DEFINE_float("validation", 0.05, "Fraction of documents held out for validation.")
_TEST = flags.DEFINE_float("test", 0.05, "Fraction of documents held out for test.")
_TOKENIZER = flags.DEFINE_string(
    "tokenizer", None, "GGUF file or HF directory for the tokenizer (default: SmolLM2 GGUF)."
)
_TOKENIZE = flags.DEFINE_bool("tokenize", True, "Tokenize and cache the splits.")
_TASKS = flags.DEFINE_list("tasks", ["mmlu"], "Tasks to fetch (mmlu, or empty for none).")
_FORCE = flags.DEFINE_bool("force", False, "Rebuild prepared domains even if up to date.")
_BENCH = flags.DEFINE_integer("bench_batches", 0, "Time this many pipeline batches (0: skip).")
_SEQ = flags.DEFINE_integer("seq_len", 512, "Sequence length for --bench_batches.")
_BATCH = flags.DEFINE_integer("batch_size", 8, "Batch size for --bench_batches.")
_OUT = flags.DEFINE_string("out", None, "JSON report path (default CACHE/data_report.json).")


def _table(report: dict) -> str:
    head = f"{'domain':<12}" + "".join(
        f"{s + ' docs':>16}{s + ' tokens':>18}" for s in corpora.SPLITS
    )
    lines = [head, "-" * len(head)]
    for name, splits in report["domains"].items():
        row = f"{name:<12}"
        for s in corpora.SPLITS:
            cell = splits[s]
            row += f"{cell['documents']:>16,}{cell.get('tokens', float('nan')):>18,}"
        lines.append(row)
    return "\n".join(lines)


def _bench(tokenizer, domains: list[str], cache) -> dict:
    cfg = pipeline.PipelineConfig(
        domains=tuple(domains), seq_len=_SEQ.value, batch_size=_BATCH.value
    )
    it = pipeline.make_iterator(cfg, tokenizer, cache)
    next(it)  # start the prefetch threads
    t0 = time.perf_counter()
    for _ in tqdm(range(_BENCH.value), desc="pipeline bench", unit="batch", leave=False):
        next(it)
    dt = time.perf_counter() - t0
    out = {
        "batch": [cfg.batch_size, cfg.seq_len],
        "batches": _BENCH.value,
        "batches_per_s": _BENCH.value / dt,
        "tokens_per_s": _BENCH.value * cfg.batch_size * cfg.seq_len / dt,
    }
    return out


def main(argv):
    del argv
    cache = fetch.cache_root(_CACHE.value)
    split = corpora.SplitConfig(seed=_SEED.value, validation=_VAL.value, test=_TEST.value)
    spec = corpora.parse_domain_spec(_DOMAINS.value)
    report: dict = {
        "cache": str(cache),
        "split": dataclasses.asdict(split),
        "domains": {},
        "errors": {},
    }
    for name in tqdm(spec, desc="domains", unit="domain"):
        m, err = corpora.prepare_domains({name: spec[name]}, cache, split, _FORCE.value)
        report["errors"].update(err)
        for d, manifest in m.items():
            report["domains"][d] = {s: dict(v) for s, v in manifest["splits"].items()}

    tokenizer = None
    if _TOKENIZE.value and report["domains"]:
        from readme_jax.checkpoints.tokenizer import load_tokenizer

        tokenizer = load_tokenizer(_TOKENIZER.value)
        report["tokenizer"] = tokenizer.name
        ready = list(report["domains"])
        for d in tqdm(ready, desc="tokenizing", unit="domain"):
            for s in corpora.SPLITS:
                meta = pipeline.prepare_tokens(d, s, tokenizer, cache, progress=True)
                report["domains"][d][s]["tokens"] = meta["tokens"]

    for task in [t for t in _TASKS.value if t]:
        if task != "mmlu":
            report["errors"][f"task:{task}"] = f"unknown task {task!r} (known: mmlu)"
            continue
        try:
            qs = tasks.load_mmlu(cache)
            report["tasks"] = {
                "mmlu": {"questions": len(qs), "subjects": len(tasks.by_subject(qs))}
            }
        except (fetch.FetchError, tasks.TaskError) as e:
            report["errors"]["task:mmlu"] = str(e)

    if _BENCH.value and tokenizer is not None and report["domains"]:
        report["pipeline_bench"] = _bench(tokenizer, list(report["domains"]), cache)

    print()
    print(_table(report))
    if "tasks" in report:
        print(f"\nMMLU: {report['tasks']['mmlu']['questions']:,} questions, "
              f"{report['tasks']['mmlu']['subjects']} subjects")  # fmt: skip
    if "pipeline_bench" in report:
        b = report["pipeline_bench"]
        print(f"\npipeline: {b['batches_per_s']:,.0f} batches/s of {b['batch']}, "
              f"{b['tokens_per_s'] / 1e6:,.2f}M tokens/s")  # fmt: skip
    out = Path(_OUT.value) if _OUT.value else cache / "data_report.json"
    fetch.atomic_write_text(out, json.dumps(report, indent=1))
    print(f"\nreport: {out}")
    for name, err in report["errors"].items():
        print(f"\nERROR [{name}]: {err}", file=sys.stderr)
    return 1 if report["errors"] else 0


if __name__ == "__main__":
    app.run(main)
