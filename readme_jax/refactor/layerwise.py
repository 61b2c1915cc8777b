"""The refactor stage one layer at a time: each layer's experts built and refit into their final
arrays as the refit reaches it. `pipeline.build_readme` (the recipe's refactor stage) and
tools/scale_test.py both build through `refactor_per_layer`.

Each layer is visited once: its weights are fetched (stacked, per-layer or read from disk:
`checkpoints.layers`), its features computed and its down rows refit
(`reconstruct.sequential_refit`), and its attention, shared and expert weights written into the
preallocated [L, ...] arrays of the Read-ME backbone. `alloc` decides where those live: host
memory (default) or files on disk (`DiskArrays`, for a model whose MoE does not fit beside the
working set). The result equals the whole-model path it replaced, construction of every layer
then a second pass refitting their down rows (tests/refactor/test_refactor_layerwise.py).
"""

from __future__ import annotations

import mmap
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np

from readme_jax.checkpoints.layers import host_layer
from readme_jax.model.config import LlamaConfig, RouterConfig
from readme_jax.model.router import init_layerwise_gates, init_router
from readme_jax.model.spec import ExpertSpec
from readme_jax.refactor import reconstruct
from readme_jax.refactor.construct import Construction, build_spec
from readme_jax.refactor.experts import _put_channels, build_expert_spec
from readme_jax.refactor.reconstruct import ReconstructConfig
from readme_jax.refactor.stats import ActivationStats

Params = dict[str, Any]
Alloc = Callable[[str, tuple[int, ...], np.dtype], np.ndarray]
# (experts, the refit's calibration rows) -> each row's token group [b, S] (-1 = none)
GroupsFn = Callable[[ExpertSpec, list[np.ndarray]], list[np.ndarray]]
_DENSE_FFN = ("w_gate_up", "w_down")


class DiskArrays:
    """An `alloc` whose arrays are .npy files in `root`, memory-mapped; `release()` writes the
    pages touched so far back and unmaps them from this process (they stay in the files)."""

    def __init__(self, root: str | Path, reuse: bool = False):
        """reuse: open arrays already in `root` (of the asked shape) instead of zeroing them."""
        self.root, self.reuse = Path(root), reuse
        self.root.mkdir(parents=True, exist_ok=True)
        self.maps: list[np.memmap] = []

    def __call__(self, name: str, shape: tuple[int, ...], dtype: np.dtype) -> np.ndarray:
        raw = np.dtype(np.uint16) if dtype == ml_dtypes.bfloat16 else dtype  # .npy has no bf16
        f = self.root / f"{name}.npy"
        m = None
        if self.reuse and f.exists():
            m = np.load(f, mmap_mode="r+")
            m = m if (m.shape, m.dtype) == (tuple(shape), raw) else None
        if m is None:
            m = np.lib.format.open_memmap(f, "w+", raw, shape)
        self.maps.append(m)
        return m.view(dtype)

    def release(self) -> None:
        for m in self.maps:
            m.flush()
            m._mmap.madvise(mmap.MADV_DONTNEED)


def _host_alloc(name: str, shape: tuple[int, ...], dtype: np.dtype) -> np.ndarray:
    return np.zeros(shape, dtype)


def experts_spec(stats: ActivationStats, remain_rate: float, con: Construction) -> ExpertSpec:
    """The experts of `con` (the paper's rule also works on statistics without the rate)."""
    if con == Construction():
        return build_expert_spec(stats.mean_abs_ExLxF, remain_rate, stats.domains)
    return build_spec(stats.groups(), remain_rate, stats.domains, con)


def _refit_tokens(dense, cfg, spec: ExpertSpec, domain_batches, n: int, assign=None):
    """(batches, token groups) of the refit on the first n rows per domain (0 = all): domain e's
    tokens on expert e; for clustered experts every token on the expert `assign` gives it, by
    default its Eq. 4 routing target (`reconstruct.target_expert_groups`)."""
    domain_batches = reconstruct.refit_subset(domain_batches, n)
    if assign is None and list(domain_batches) == list(spec.domains):
        return reconstruct.domain_groups([domain_batches[d] for d in spec.domains])
    if assign is not None or all(d.startswith("cluster") for d in spec.domains):
        batches = [b for bs in domain_batches.values() for b in bs]
        assign = assign or (lambda s, rows: reconstruct.target_expert_groups(dense, cfg, s, rows))
        return batches, assign(spec, batches)
    raise ValueError(f"calibration domains {list(domain_batches)} != experts {spec.domains}")


def refactor_per_layer(
    dense: Params,
    cfg: LlamaConfig,
    stats: ActivationStats,
    remain_rate: float,
    router_cfg: RouterConfig,
    refit: ReconstructConfig,
    domain_batches: dict[str, Sequence[np.ndarray]] | None,
    seed: int = 0,
    construction: Construction | None = None,
    alloc: Alloc | None = None,
    as_jax: bool = True,
    resume_dir: str | Path | None = None,
    groups: GroupsFn | None = None,
) -> tuple[Params, ExpertSpec]:
    """Read-ME params {"backbone", "router"} (the layer-wise gates included) and the expert spec
    of `construction` (default: the paper's rule), built and refit in one pass over the layers.

    groups(spec, rows): the refit's token groups when they are not the domains or the Eq. 4
    target (context clusters, a router's choices: `pipeline.build_readme`).
    alloc(name, shape, dtype): the backbone's [L, ...] layer arrays (default: zeroed host
    arrays; the attention and norm weights of stacked dense layers are then the dense arrays
    themselves, not copies). as_jax: hand each to JAX at the end, one at a time (else the
    backbone's layers stay the allocated arrays, e.g. memory-mapped files for `save_readme`).
    domain_batches: the calibration batches (refit.mode "none": unused). Memory beyond those
    arrays: one dense layer and the refit's working set (`reconstruct.sequential_refit`).

    resume_dir: build the arrays in files there (`DiskArrays`, unless `alloc` is one that
    reuses its files) and save the refit's progress after each layer; a call with the same
    arguments after an interruption keeps the finished layers and starts at the next one (the
    statistics must be the same: the calibrate stage caches them)."""
    spec = experts_spec(stats, remain_rate, construction or Construction())
    E, L = spec.num_experts, cfg.n_layers
    k_router, k_gates = jax.random.split(jax.random.key(seed))
    gates = init_layerwise_gates(cfg, E, k_gates)
    if resume_dir is not None and alloc is None:
        alloc = DiskArrays(Path(resume_dir) / "arrays", reuse=True)
    alloc = alloc or _host_alloc
    first = host_layer(dense, 0)
    dt = first["w_down"].dtype
    D = cfg.dim
    Fs, Fe = spec.shared_idx_LxFs.shape[1], spec.expert_idx_LxExFe.shape[2]
    shapes = {k: (L, *v.shape) for k, v in first.items() if k not in _DENSE_FFN}
    stacked = isinstance(dense["layers"], dict) and alloc is _host_alloc
    kept = {k: dense["layers"][k] for k in shapes} if stacked else {}
    shapes = {k: v for k, v in shapes.items() if k not in kept}
    shapes |= {
        "shared_gate_up": (L, D, 2, Fs),
        "shared_down": (L, Fs, D),
        "expert_gate_up": (L, E, D, 2, Fe),
        "expert_down": (L, E, Fe, D),
    }
    del first
    out = {k: alloc(k, s, dt) for k, s in shapes.items()}

    def write(l: int, rows: list[np.ndarray] | None) -> None:
        lp = host_layer(dense, l)
        for k in shapes:
            if k in lp:
                out[k][l] = lp[k]
        sh, ex = spec.shared_idx_LxFs[l], spec.expert_idx_LxExFe[l]
        _put_channels(out["shared_gate_up"][l], out["shared_down"][l], *_ffn(lp), sh)
        for e in range(E):
            _put_channels(out["expert_gate_up"][l, e], out["expert_down"][l, e], *_ffn(lp), ex[e])
        if rows is not None:  # the refit rows replace the copied ones; padding stays zero
            out["shared_down"][l, : len(rows[0])] = rows[0]
            for e in range(E):
                out["expert_down"][l, e, : len(rows[1 + e])] = rows[1 + e]
        if isinstance(alloc, DiskArrays):
            alloc.release()

    if refit.mode == "none":
        for l in range(L):
            write(l, None)
    else:
        n = refit.calib_sequences
        batches, tg = _refit_tokens(dense, cfg, spec, domain_batches, n, groups)
        parts = reconstruct.readme_parts(spec)
        desc = "refactor per layer"
        reconstruct.sequential_refit(
            dense, cfg, batches, tg, parts, refit.ridge, desc, write, resume_dir
        )
    layers = dict(kept)
    for k in list(out):  # one host array at a time becomes a JAX array
        layers[k] = jnp.asarray(out.pop(k)) if as_jax else out.pop(k)
    layers["gate"] = jnp.asarray(gates, dt)
    router = init_router(router_cfg, cfg, E, k_router, backbone_embed_VxD=dense["embed"])
    return {"backbone": {**dense, "layers": layers}, "router": router}, spec


def _ffn(lp: dict[str, np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    return lp["w_gate_up"], lp["w_down"]
