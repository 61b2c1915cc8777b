"""How fast XLA:CPU streams a chain of batch-1 FFN matvecs at several widths (GB/s).

    python tools/matvec_scaling.py [--widths 1536,768,384] [--one_core]

Runs 30 SmolLM2-shaped FFNs (D = 576, gate/up [D, 2, F] and down [F, D], f32, one residual
chain, per-layer arrays as the decode layout holds them) for each width F in alternating rounds
and prints the median ms and the weight bytes streamed per second. With --one_core the process
pins itself to one CPU before JAX starts. On the development machine (2 cores), both cores
streamed 18.5 GB/s at F = 1536 but 14.2 at 768 and 11.3 at 384, while one core streamed
9.7-9.9 GB/s at every width: a matvec split over threads pays a fixed hand-off per op, which a
narrow matvec does not amortize. This is why the MoE's batch-1 decode is bytes-proportional on
one core and not on two (docs/benchmarks.md).
"""

from __future__ import annotations

import argparse
import os
import statistics
import time


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--widths", default="1536,768,384")
    ap.add_argument("--layers", type=int, default=30)
    ap.add_argument("--dim", type=int, default=576)
    ap.add_argument("--rounds", type=int, default=12)
    ap.add_argument("--one_core", action="store_true", help="pin to one CPU first")
    a = ap.parse_args()
    if a.one_core:
        os.sched_setaffinity(0, {min(os.sched_getaffinity(0))})
    import jax
    import jax.numpy as jnp

    L, D = a.layers, a.dim
    widths = [int(w) for w in a.widths.split(",")]

    def chain(x, weights):
        for gu, down in weights:
            g = jnp.einsum("bd,dtf->btf", x, gu)
            x = x + (jax.nn.silu(g[:, 0]) * g[:, 1]) @ down
        return x

    x = jax.random.normal(jax.random.key(0), (1, D))
    runs = {}
    for F in widths:
        keys = jax.random.split(jax.random.key(F), 2 * L)
        weights = [
            (
                0.02 * jax.random.normal(keys[2 * i], (D, 2, F)),
                0.02 * jax.random.normal(keys[2 * i + 1], (F, D)),
            )
            for i in range(L)
        ]
        f = jax.jit(chain)
        f(x, weights).block_until_ready()
        runs[F] = (f, weights)
    ms = {F: [] for F in widths}
    for _ in range(a.rounds):
        for F, (f, weights) in runs.items():
            t = time.perf_counter()
            for _ in range(10):
                y = f(x, weights)
            y.block_until_ready()
            ms[F].append((time.perf_counter() - t) / 10 * 1e3)
    cpus = len(os.sched_getaffinity(0))
    print(f"{L} FFNs, D = {D}, f32, {cpus} CPU(s), median of {a.rounds} rounds")
    for F in widths:
        m = statistics.median(ms[F])
        print(f"F = {F:5d}: {m:7.2f} ms  {L * 3 * D * F * 4 / m / 1e6:5.1f} GB/s")


if __name__ == "__main__":
    main()
