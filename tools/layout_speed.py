"""Decode tokens/s of the two decode layouts (decode/steps.py LAYOUTS: trimmed, stacked) side by
side: the bundled SmolLM2-135M dense model and, if given, a Read-ME model directory; alternating
rounds in one process (eval/bytes_bench.py `decode_rates`), best round each.

  python tools/layout_speed.py runs/smollm2_135m/moe_trained
"""

from __future__ import annotations

import argparse

import readme_jax as rj
from readme_jax.decode.steps import LAYOUTS
from readme_jax.eval.bytes_bench import decode_rates


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("readme", nargs="?", default="", help="a Read-ME model directory (optional)")
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 8])
    ap.add_argument("--steps", type=int, default=32)
    ap.add_argument("--rounds", type=int, default=3)
    a = ap.parse_args()
    for name, path in [("dense", None), ("Read-ME", a.readme)][: 2 if a.readme else 1]:
        gens = {lay: rj.load(path, layout=lay).generator() for lay in LAYOUTS}
        r = decode_rates(gens, a.batches, steps=a.steps, rounds=a.rounds)
        for b in a.batches:
            t, s = r["trimmed"][b], r["stacked"][b]
            print(f"{name} batch {b}: trimmed {t:.1f} tok/s, stacked {s:.1f} tok/s ({s / t:.2f}x)")


if __name__ == "__main__":
    main()
