"""The training mesh (`data`, `fsdp`, `expert`) and logical-axis sharding of params and batches.

Parameters are named by their tree keys; each key maps to logical axes (PARAM_AXES), and
RULES maps logical axes to mesh axes. A dimension that the mesh axis does not divide stays
replicated. Axis types are Auto: the step is written without sharding annotations and GSPMD
places the collectives; the MoE's expert-parallel shard_map (model/moe.py) takes its inputs as
its in_specs say.
"""

from __future__ import annotations

from typing import Any

import jax
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

AXES = ("data", "fsdp", "expert")
BATCH = ("data", "fsdp")  # the batch dimension is split over both
RULES: dict[str, Any] = {
    "batch": BATCH,
    "embed": "fsdp",
    "expert": "expert",
    "vocab": None,
    "mlp": None,
    "heads": None,
    "layers": None,
}
# logical axes by parameter name; layer-stacked leaves get a leading "layers"
PARAM_AXES: dict[str, tuple] = {
    "embed": ("vocab", "embed"),
    "lm_head": ("embed", "vocab"),
    "final_norm": (None,),
    "attn_norm": (None,),
    "mlp_norm": (None,),
    "wqkv": ("embed", "heads", None),
    "wo": ("heads", None, "embed"),
    "w_gate_up": ("embed", None, "mlp"),
    "w_down": ("mlp", "embed"),
    "shared_gate_up": ("embed", None, "mlp"),
    "shared_down": ("mlp", "embed"),
    "expert_gate_up": ("expert", "embed", None, "mlp"),
    "expert_down": ("expert", "mlp", "embed"),
    "gate": ("embed", None),
    "head": ("embed", None),
}


def make_mesh(data: int = -1, fsdp: int = 1, expert: int = 1, devices=None) -> Mesh:
    """A (data, fsdp, expert) mesh. One axis may be -1: it takes all devices the others leave.
    With every size given, the mesh may use fewer devices than there are (the first ones)."""
    devices = list(jax.devices() if devices is None else devices)
    sizes = {"data": data, "fsdp": fsdp, "expert": expert}
    free = [k for k, v in sizes.items() if v == -1]
    if len(free) > 1:
        raise ValueError(f"at most one mesh axis may be -1, got {sizes}")
    n = len(devices)
    fixed = int(np.prod([v for v in sizes.values() if v != -1]))
    if free:
        if n % fixed:
            raise ValueError(f"{n} devices are not divisible by the fixed mesh axes {sizes}")
        sizes[free[0]] = n // fixed
    elif fixed < n:
        devices, n = devices[:fixed], fixed
    if int(np.prod(list(sizes.values()))) != n:
        raise ValueError(
            f"mesh {sizes} needs {int(np.prod(list(sizes.values())))} devices, found {n} "
            "(set one of --config.mesh.{data,fsdp,expert}=-1 to fill)"
        )
    shape = tuple(sizes[a] for a in AXES)
    return jax.make_mesh(shape, AXES, axis_types=(AxisType.Auto,) * 3, devices=devices)


def mesh_from_config(c: Any) -> Mesh:
    m = c.mesh if "mesh" in c else {}
    get = lambda k, d: int(m[k]) if k in m else d
    return make_mesh(get("data", -1), get("fsdp", 1), get("expert", 1))


def _key_name(k) -> str:
    return str(getattr(k, "key", getattr(k, "name", getattr(k, "idx", k))))


def logical_axes(path, ndim: int) -> tuple:
    """Logical axes of a parameter from its tree path (unknown names: replicated)."""
    names = [_key_name(k) for k in path]
    axes = PARAM_AXES.get(names[-1], ())
    if "layers" in names and len(axes) == ndim - 1:
        axes = ("layers", *axes)
    if len(axes) != ndim:
        return (None,) * ndim
    return axes


def spec_for(axes: tuple, shape: tuple, mesh: Mesh) -> P:
    out = []
    for ax, dim in zip(axes, shape, strict=True):
        m = RULES.get(ax) if ax is not None else None
        sizes = [mesh.shape[a] for a in (m if isinstance(m, tuple) else (m,))] if m else [1]
        size = int(np.prod(sizes))
        out.append(m if m is not None and size > 1 and dim % size == 0 else None)
    return P(*out)


def param_shardings(params: Any, mesh: Mesh) -> Any:
    """NamedSharding for every leaf of a parameter tree (arrays or ShapeDtypeStructs)."""

    def one(path, leaf):
        return NamedSharding(mesh, spec_for(logical_axes(path, leaf.ndim), leaf.shape, mesh))

    return jax.tree_util.tree_map_with_path(one, params)


def state_shardings(tree: Any, mesh: Mesh) -> Any:
    """Shardings for a train state: optimizer moments follow their parameter (optax keeps the
    parameter's keys in its state paths); scalars and counters are replicated."""

    def one(path, leaf):
        if getattr(leaf, "ndim", 0) == 0:
            return NamedSharding(mesh, P())
        return NamedSharding(mesh, spec_for(logical_axes(path, leaf.ndim), leaf.shape, mesh))

    return jax.tree_util.tree_map_with_path(one, tree)


def batch_sharding(mesh: Mesh, ndim: int = 2) -> NamedSharding:
    return NamedSharding(mesh, P(BATCH, *([None] * (ndim - 1))))


def global_batch(local: dict[str, np.ndarray], mesh: Mesh) -> dict[str, jax.Array]:
    """This process's rows -> global arrays sharded over (data, fsdp) on the batch axis."""
    return {
        k: jax.make_array_from_process_local_data(batch_sharding(mesh, np.ndim(v)), np.asarray(v))
        for k, v in local.items()
    }


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P())
