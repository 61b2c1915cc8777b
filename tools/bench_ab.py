"""Speed of this checkout against an earlier commit, measured side by side in one run.

    python tools/bench_ab.py --old a4aae53 [--rounds 2] [--out docs/bench_ab.json]

Each round runs the same measurement in the old checkout, then in this one (alternating, so a
slow spell of a shared machine hits both), each in a fresh process whose `readme_jax` and
speed functions (`readme_jax/eval/speed.py`, or before it `tools/bench.py`) are that checkout's
own: dense SmolLM2 decode tokens/s at batch 1 and 8 and 512-token prefill tokens/s
(`bench_dense`, one round), and the same for a Read-ME MoE refactored by `quick_moe` (remain
rate 0.5, untrained router) through the static-batch Generator. The report is the best round of
each metric and the ratio new/old; between 0.9x and 1.1x is within run-to-run noise on this
2-core machine (docs/benchmarks.md).

--old is a commit (checked out into a temporary `git worktree`) or the path of a checkout.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

# runs inside a checkout (cwd = its root); the layouts before and after the renovation that
# made one decode step library (the Generator and the Read-ME decode model moved), and before
# and after the speed functions moved from tools/bench.py into readme_jax/eval/speed.py
CHILD = r"""
import importlib.util, json
try:
    from readme_jax.eval import speed as bench
except ImportError:
    spec = importlib.util.spec_from_file_location("bench", "tools/bench.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
from readme_jax.checkpoints.gguf import load_gguf
from readme_jax.checkpoints.tokenizer import load_tokenizer
cfg, params = load_gguf()
d = bench.bench_dense(cfg, params, False, rounds=1)
res = {"dense_" + k: d[k] for k in ("prefill_512_tok_s", "decode_b1_tok_s", "decode_b8_tok_s")}
rc, mp, _ = bench.quick_moe(cfg, params, load_tokenizer())
try:
    from readme_jax.decode.generator import Generator
    from readme_jax.decode.steps import readme_model
    model = readme_model(rc)
except ImportError:
    from readme_jax.model.generate import Generator
    from readme_jax.model.readme import decode_model
    model = decode_model(rc, "select")
g = Generator(model, mp)
prompt = list(range(1000, 1032))
res["moe_prefill_512_tok_s"] = bench.prefill_tok_s(g.model, g.params)
for b in (1, 8):
    res[f"moe_decode_b{b}_tok_s"] = b / bench.decode_step_time(g, [prompt] * b)
print("RESULT " + json.dumps(res))
"""


def measure(tree: Path) -> dict:
    env = {**os.environ, "PYTHONPATH": str(tree), "JAX_PLATFORMS": "cpu"}
    env.pop("XLA_FLAGS", None)
    r = subprocess.run(
        [sys.executable, "-c", CHILD], cwd=tree, env=env, capture_output=True, text=True
    )
    line = [x for x in r.stdout.splitlines() if x.startswith("RESULT ")]
    if r.returncode != 0 or not line:
        raise SystemExit(f"bench_ab: measuring {tree} failed:\n{r.stderr[-3000:]}")
    return json.loads(line[-1][len("RESULT ") :])


def checkout(old: str, tmp: Path) -> Path:
    if Path(old).is_dir():
        return Path(old).resolve()
    path = tmp / "old"
    subprocess.run(
        ["git", "-C", str(ROOT), "worktree", "add", "--detach", str(path), old],
        check=True,
        capture_output=True,
    )
    return path


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--old", required=True, help="commit or checkout path to compare against")
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--out", default="", help="JSON file for every round and the summary")
    a = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        old = checkout(a.old, Path(tmp))
        try:
            runs: dict[str, list[dict]] = {"old": [], "new": []}
            for i in range(a.rounds):
                for name, tree in (("old", old), ("new", ROOT)):
                    runs[name].append(measure(tree))
                    print(f"[bench_ab] round {i + 1}/{a.rounds} {name}: {runs[name][-1]}")
        finally:
            if old.parent == Path(tmp):
                subprocess.run(["git", "-C", str(ROOT), "worktree", "remove", "--force", str(old)])
    best = {n: {k: max(r[k] for r in rs) for k in rs[0]} for n, rs in runs.items()}
    print(f"\n| metric | old ({a.old}) | new | new/old |\n|---|---|---|---|")
    for k in best["new"]:
        o, n = best["old"][k], best["new"][k]
        print(f"| {k} | {o:.1f} | {n:.1f} | {n / o:.2f}x |")
    if a.out:
        Path(a.out).write_text(json.dumps({"old": a.old, "runs": runs, "best": best}, indent=2))


if __name__ == "__main__":
    main()
