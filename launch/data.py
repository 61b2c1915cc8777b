"""Fetch and prepare the text domains and MMLU; print and save a table of documents and tokens.

Examples:
  python launch/data.py                                   # the four default domains, chat, MMLU
  python launch/data.py --config.chat.conversations=960   # more teacher conversations
  python launch/data.py --config.domains=fiction,legal=/data/legal.jsonl --config.tasks=
  python launch/data.py --config.bench_batches=2000       # also time the grain pipeline

Settings: configs/data.py (`--config=FILE` for another); the old flag names (--domains=...,
--tasks=, --bench_batches=N, --notokenize) still work.

The `chat` domain is sampled from the teacher (default: the bundled SmolLM2-135M-Instruct) in
its own chat template (readme_jax/data/chat.py); it is redone only when its settings or the
teacher change.

Everything lands in the cache directory (config `cache`, default $READMEJAX_CACHE_DIR or
~/.cache/readme_jax) and is reused on the next run. A domain that cannot be fetched is reported
with instructions; the others still work.
"""

from __future__ import annotations

import dataclasses
import json
import sys
import time
from pathlib import Path

from tqdm.auto import tqdm

import readme_jax as rj
from readme_jax import cli
from readme_jax.checkpoints.tokenizer import load_tokenizer
from readme_jax.data import chat, corpora, fetch, pipeline, tasks

CONFIG = Path(__file__).resolve().parents[1] / "configs" / "data.py"
NEGATED = {"notokenize": "tokenize", "noforce": "force"}


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


def _bench(c, tokenizer, domains: list[str], cache) -> dict:
    cfg = pipeline.PipelineConfig(
        domains=tuple(domains), seq_len=c.seq_len, batch_size=c.batch_size
    )
    it = pipeline.make_iterator(cfg, tokenizer, cache)
    next(it)  # start the prefetch threads
    t0 = time.perf_counter()
    for _ in tqdm(range(c.bench_batches), desc="pipeline bench", unit="batch", leave=False):
        next(it)
    dt = time.perf_counter() - t0
    out = {
        "batch": [cfg.batch_size, cfg.seq_len],
        "batches": c.bench_batches,
        "batches_per_s": c.bench_batches / dt,
        "tokens_per_s": c.bench_batches * cfg.batch_size * cfg.seq_len / dt,
    }
    return out


def _build_chat(c, cache) -> None:
    """Sample the chat domain from the teacher unless an up-to-date one is prepared."""
    cfg = chat.ChatConfig.from_config(c.chat)
    teacher = c.chat.teacher or "SmolLM2-135M-Instruct (bundled GGUF)"
    if chat.is_current(cfg, teacher, cache) and not c.force:
        return
    t0 = time.perf_counter()
    model = rj.load(c.chat.teacher or None)
    gen = model.generator()

    def sample(prompts, max_new, temperature, top_p, seed):
        return gen.sample(prompts, max_new, temperature, top_p, seed, pad_to=cfg.batch_size)

    m = chat.build_chat_domain(
        sample, model.tokenizer, cfg, teacher, cache, progress=True, force=c.force
    )
    print(
        f"chat: {m['conversations']} of {cfg.conversations} sampled conversations kept, from "
        f"{teacher}, in {time.perf_counter() - t0:.0f}s"
    )


def main(argv: list[str] | None = None) -> int:
    c = cli.parse_config(CONFIG, sys.argv[1:] if argv is None else argv, NEGATED)
    cache = fetch.cache_root(c.cache or None)
    split = corpora.SplitConfig(seed=c.split_seed, validation=c.validation, test=c.test)
    spec = corpora.parse_domain_spec(list(cli.csv(c.domains)))
    report: dict = {
        "cache": str(cache),
        "split": dataclasses.asdict(split),
        "domains": {},
        "errors": {},
    }
    for name in tqdm(spec, desc="domains", unit="domain"):
        if name == chat.CHAT_DOMAIN and spec[name] is None:
            try:
                _build_chat(c, cache)
            except corpora.CorpusError as e:
                report["errors"][name] = str(e)
                continue
        m, err = corpora.prepare_domains({name: spec[name]}, cache, split, c.force)
        report["errors"].update(err)
        for d, manifest in m.items():
            report["domains"][d] = {s: dict(v) for s, v in manifest["splits"].items()}

    tokenizer = None
    if c.tokenize and report["domains"]:
        tokenizer = load_tokenizer(c.tokenizer or None)
        report["tokenizer"] = tokenizer.name
        ready = list(report["domains"])
        for d in tqdm(ready, desc="tokenizing", unit="domain"):
            for s in corpora.SPLITS:
                meta = pipeline.prepare_tokens(d, s, tokenizer, cache, progress=True)
                report["domains"][d][s]["tokens"] = meta["tokens"]

    for task in cli.csv(c.tasks):
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

    if c.bench_batches and tokenizer is not None and report["domains"]:
        report["pipeline_bench"] = _bench(c, tokenizer, list(report["domains"]), cache)

    print()
    print(_table(report))
    if "tasks" in report:
        print(
            f"\nMMLU: {report['tasks']['mmlu']['questions']:,} questions, "
            f"{report['tasks']['mmlu']['subjects']} subjects"
        )
    if "pipeline_bench" in report:
        b = report["pipeline_bench"]
        print(
            f"\npipeline: {b['batches_per_s']:,.0f} batches/s of {b['batch']}, "
            f"{b['tokens_per_s'] / 1e6:,.2f}M tokens/s"
        )
    out = Path(c.out) if c.out else cache / "data_report.json"
    fetch.atomic_write_text(out, json.dumps(report, indent=1))
    print(f"\nreport: {out}")
    for name, err in report["errors"].items():
        print(f"\nERROR [{name}]: {err}", file=sys.stderr)
    return 1 if report["errors"] else 0


if __name__ == "__main__":
    sys.exit(cli.guarded(main)())
