"""Downstream-task table: the offline lm_eval tasks (readme_cloze, readme_mmlu) for the dense
teacher and every model of one or more run directories (Read-ME, layer-wise, static pruning),
accuracy with lm_eval's standard errors, into OUT/downstream.json and OUT/downstream.md.

  python launch/downstream.py runs/compare_rr0.5 --limit 200 --out docs/compare
  python launch/downstream.py runs/x --teacher model.gguf --tasks readme_cloze

The teacher defaults to the run's source checkpoint (its config.json; "" = bundled SmolLM2).
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

from lm_eval import simple_evaluate
from lm_eval.tasks import TaskManager

from readme_jax.checkpoints import models
from readme_jax.eval.harness import ReadmeLM
from readme_jax.eval.report import md_table
from readme_jax.eval.tasks import TASKS_DIR


def _models(runs: list[Path], teacher: str | None) -> dict[str, str]:
    if teacher is None and runs and (runs[0] / "config.json").exists():
        teacher = json.loads((runs[0] / "config.json").read_text())["model"]["checkpoint"]
    out = {"dense teacher": teacher or ""}
    for run in runs:
        for path in models.list_models(run):
            out[f"{run.name}/{path.name}"] = str(path)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("runs", nargs="*", type=Path, help="run directories (launch/train.py)")
    ap.add_argument("--teacher", default=None, help="dense checkpoint (default: the run's)")
    ap.add_argument("--tasks", default="readme_cloze,readme_mmlu")
    ap.add_argument("--limit", type=int, default=None, help="examples per task (lm_eval)")
    ap.add_argument("--batch_size", type=int, default=8)
    ap.add_argument("--out", type=Path, default=Path("runs/downstream"))
    a = ap.parse_args()
    os.environ.setdefault("DISABLE_MULTIPROC", "1")  # lm_eval's bootstrap must not fork JAX
    tasks = a.tasks.split(",")
    rows, table = {}, []
    for name, ckpt in _models(a.runs, a.teacher).items():
        t0 = time.time()
        lm = ReadmeLM(ckpt, batch_size=a.batch_size)
        tm = TaskManager(include_path=str(TASKS_DIR), include_defaults=False)
        res = simple_evaluate(model=lm, tasks=tasks, task_manager=tm, limit=a.limit)
        got = {**res["results"], **res.get("groups", {})}
        rows[name] = {"checkpoint": ckpt, "seconds": time.time() - t0, "results": got}
        cells = [f"{got[t]['acc,none']:.4f} ± {got[t]['acc_stderr,none']:.4f}" for t in tasks]
        table.append([name, *cells, f"{rows[name]['seconds']:.0f}"])
        print(f"[downstream] {name}: {cells} in {rows[name]['seconds']:.0f}s", flush=True)
    a.out.mkdir(parents=True, exist_ok=True)
    meta = {"tasks": tasks, "limit": a.limit, "runs": [str(r) for r in a.runs]}
    (a.out / "downstream.json").write_text(json.dumps({"meta": meta, "models": rows}, indent=1))
    head = ["model", *[f"{t} acc ± stderr" for t in tasks], "seconds"]
    md = f"# Downstream tasks (lm_eval, limit {a.limit})\n\n" + md_table(head, table) + "\n"
    (a.out / "downstream.md").write_text(md)
    print(md)


if __name__ == "__main__":
    main()
