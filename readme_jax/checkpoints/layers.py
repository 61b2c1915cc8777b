"""Dense layers one at a time: from a Hugging Face directory read on demand, or from params.

Refactoring visits the layers in order (calibration, construction, refit), so it never needs the
whole model resident: `open_hf` loads the embedding, final norm and LM head and leaves the
decoder layers on disk, where `HFLayers[l]` reads layer l (one tensor at a time, into our
layout) when it is used. A 7B checkpoint's layers are 13 GB in bf16; one is 0.4 GB. Repeated
reads come from the page cache, which the kernel reclaims under pressure (unlike the process's
own memory).

`layer(dense, l)` is layer l's tree from any of the three layouts: stacked [L, ...] leaves, a
list of per-layer trees, or `HFLayers`.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import jax
import numpy as np

from readme_jax.checkpoints import hf
from readme_jax.checkpoints.errors import CheckpointError
from readme_jax.model.config import LlamaConfig
from readme_jax.model.llama import param_shapes

Params = dict[str, Any]


class HFLayers(Sequence):
    """The decoder layers of a Hugging Face directory; item l is layer l as host arrays in the
    model dtype, read from the safetensors files when asked for (not cached)."""

    def __init__(self, root: Path, cfg: LlamaConfig, tensors: dict[str, hf.TensorInfo]):
        self.cfg, self.tensors = cfg, tensors
        self.dtype = hf._np_dtype(cfg.dtype)
        self.shapes = {k: v[1:] for k, v in param_shapes(cfg)["layers"].items()}
        self.slots: list[list[hf._Slot]] = [[] for _ in range(cfg.n_layers)]
        for s in hf._slots(cfg):
            if s.group[0] == "layers":  # index (l, ...) -> (...) within the layer
                self.slots[s.index[0]].append(dataclasses.replace(s, index=s.index[1:]))

    def __len__(self) -> int:
        return self.cfg.n_layers

    def __getitem__(self, l: int) -> dict[str, np.ndarray]:
        if not 0 <= l < len(self):
            raise IndexError(l)
        handles: dict[Path, Any] = {}
        try:
            return {
                k: hf._fill_group(
                    shape,
                    self.dtype,
                    [s for s in self.slots[l] if s.group[1] == k],
                    self.tensors,
                    handles,
                )
                for k, shape in self.shapes.items()
            }
        finally:
            for f in handles.values():
                f.close()

    @property
    def nbytes(self) -> int:
        """Bytes of all layers in the model dtype."""
        per = sum(int(np.prod(s)) for s in self.shapes.values()) * self.dtype.itemsize
        return per * len(self)


def open_hf(path: str | Path, dtype: Any = None) -> tuple[LlamaConfig, Params]:
    """(cfg, params) of a Hugging Face Llama directory with params["layers"] an `HFLayers`
    (read per layer) and the other leaves loaded. Raises as `hf.load_hf`."""
    root = Path(path)
    if not root.is_dir():
        raise CheckpointError(f"{root}: not a directory; expected a Hugging Face model directory")
    overrides = {} if dtype is None else {"dtype": hf._np_dtype(dtype).name}
    _, cfg = hf._read_config(root, overrides)
    tensors = hf._tensor_index(root)
    slots = hf._slots(cfg)
    hf._check_tensors(root, cfg, slots, tensors)
    params: Params = {}
    handles: dict[Path, Any] = {}
    try:
        for group, shape in hf._groups(param_shapes(cfg)):
            if group[0] != "layers":
                mine = [s for s in slots if s.group == group]
                arr = hf._fill_group(shape, hf._np_dtype(cfg.dtype), mine, tensors, handles)
                params[group[0]] = jax.device_put(arr)
    finally:
        for f in handles.values():
            f.close()
    params["layers"] = HFLayers(root, cfg, tensors)
    return cfg, params


def num_layers(dense: Params) -> int:
    layers = dense["layers"]
    if isinstance(layers, dict):
        return int(next(iter(layers.values())).shape[0])
    return len(layers)


def layer(dense: Params, l: int) -> Params:
    """Layer l's tree (jax arrays, the model's dtype) from stacked, per-layer or `HFLayers`
    layers; a stacked layer is sliced on device (no host copy of the model)."""
    layers = dense["layers"]
    if isinstance(layers, dict):
        return {k: _index(v, l) for k, v in layers.items()}
    return {k: jax.numpy.asarray(v) for k, v in layers[l].items()}


def host_layer(dense: Params, l: int) -> dict[str, np.ndarray]:
    """Layer l as host arrays: a view for host-resident stacked params, else a read or copy."""
    layers = dense["layers"]
    if isinstance(layers, dict):
        return {k: np.asarray(v)[l] for k, v in layers.items()}
    return {k: np.asarray(v) for k, v in layers[l].items()}


@jax.jit
def _index(stacked_LxX, l):
    return jax.lax.dynamic_index_in_dim(stacked_LxX, l, keepdims=False)
