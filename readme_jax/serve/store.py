"""Host-offloaded routed experts with a device-resident buffer of C expert slots.

Dimension letters: E experts, C cache slots, L layers, D width, F ffn width.

The routed experts are any pytree whose leaves carry a leading expert axis, e.g.
{"w_gate_up": [E, L, D, 2, F], "w_down": [E, L, F, D]}, or the same in a low-bit form
(`quant.quantize_experts`: int8 values and f32 scales are the leaves, so a load moves the
stored bytes, a quarter of f32's, and the slots hold int8 `QWeight`s that the steps read).
Each expert's slice is kept as its own host array (`memory_kind="pinned_host"`, or NumPy
where the backend has no memory kinds), so a load is one host->device `device_put` plus a
jitted, donated `dynamic_update_index_in_dim` into the slot buffer (leaves [C, ...]; no copy
of the whole buffer). Both are dispatched
asynchronously: `load` returns before the copy lands. The compute reads
`store.slots` and maps tokens to slots with `slot_of` (kept in step with an `ExpertCache`).

A jitted call waits for all of its inputs, so a load overlaps compute already
dispatched (the previous step, or earlier layers), never the call that reads the slot. With
`layer_axis` set, every leaf is split along its layer axis and `slots` is a list of L per-layer
buffers, loaded in layer order: an engine that dispatches layers (or groups of layers)
separately then overlaps the load of layer l+1 with the compute of layer l, as in the paper.
"""

from __future__ import annotations

import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np


def memory_kinds(device: jax.Device) -> set[str]:
    """Memory kinds the device can address (empty where the backend has none)."""
    try:
        return {m.kind for m in device.addressable_memories()}
    except (AttributeError, NotImplementedError, RuntimeError):
        return set()


@jax.jit
def _gather(slots: Any, slot_ids: jax.Array) -> Any:
    return jax.tree.map(lambda b: b[slot_ids], slots)


def _set_slot(slots: Any, expert: Any, slot: jax.Array) -> Any:
    return jax.tree.map(
        lambda b, x: jax.lax.dynamic_update_index_in_dim(b, x, slot, 0), slots, expert
    )


_set_slot_donated = jax.jit(_set_slot, donate_argnums=0)


class OffloadedExpertStore:
    """E experts in host memory, C of them in device slots.

    `experts`: pytree of arrays [E, ...]. `host_memory_kind=None` forces the NumPy store.
    `layer_axis`: axis of the layer dimension in the leaves (e.g. 1 for [E, L, ...]) to keep
    per-layer slot buffers; None keeps one buffer per leaf.
    Counters: `loads`, `bytes_moved` (every load), `load_time_s` (loads run with block=True).
    """

    def __init__(
        self,
        experts: Any,
        capacity: int,
        *,
        device: jax.Device | None = None,
        host_memory_kind: str | None = "pinned_host",
        layer_axis: int | None = None,
    ):
        leaves = jax.tree.leaves(experts)
        if not leaves:
            raise ValueError("expert pytree has no arrays")
        sizes = {np.shape(x)[0] if np.ndim(x) else None for x in leaves}
        if len(sizes) != 1 or None in sizes:
            raise ValueError(f"every expert leaf needs the same leading expert axis, got {sizes}")
        self.num_experts = sizes.pop()
        if not 1 <= capacity:
            raise ValueError(f"store capacity must be >= 1, got {capacity}")
        self.capacity = capacity
        self.device = device or jax.devices()[0]
        kinds = memory_kinds(self.device)
        self.host_memory_kind = host_memory_kind if host_memory_kind in kinds else None
        self._device_sharding = jax.sharding.make_single_device_sharding(
            self.device, memory_kind="device" if "device" in kinds else None
        )
        self.layer_axis = layer_axis
        # per expert, so a large pytree is copied to host one expert slice at a time
        self._host = [
            self._to_host(self._split(jax.tree.map(lambda x, e=e: x[e], experts), layer_axis))
            for e in range(self.num_experts)
        ]  # [E][P] trees, P = 1 or L
        self.bytes_per_expert = sum(x.nbytes for x in jax.tree.leaves(self._host[0]))
        self._slots = [
            jax.tree.map(
                lambda x: jax.device_put(
                    jnp.zeros((capacity, *x.shape), x.dtype), self._device_sharding
                ),
                part,
            )
            for part in self._host[0]
        ]  # [P] trees of leaves [C, ...]
        self._expert_in = [-1] * capacity
        self._slot: dict[int, int] = {}
        self.loads, self.bytes_moved, self.load_time_s = 0, 0, 0.0

    @staticmethod
    def _split(expert: Any, layer_axis: int | None) -> list[Any]:
        """One expert's tree as [tree] or, per layer, [L trees]."""
        if layer_axis is None:
            return [jax.tree.map(np.asarray, expert)]
        if layer_axis < 1:
            raise ValueError(f"layer_axis must be >= 1 (axis 0 is experts), got {layer_axis}")
        axis = layer_axis - 1  # the expert axis is gone
        depths = {np.shape(x)[axis] if np.ndim(x) > axis else None for x in jax.tree.leaves(expert)}
        if len(depths) != 1 or None in depths:
            raise ValueError(f"every expert leaf needs the same layer axis {layer_axis}: {depths}")
        return [
            jax.tree.map(lambda x, l=l: np.take(np.asarray(x), l, axis=axis), expert)
            for l in range(depths.pop())
        ]

    @property
    def slots(self) -> Any:
        """Device slot buffers: a tree of [C, ...] leaves, or a list of L such trees."""
        return self._slots[0] if self.layer_axis is None else self._slots

    def _to_host(self, tree: Any) -> Any:
        if self.host_memory_kind is None:
            return jax.tree.map(np.array, tree)  # own copy, not a view of the caller's array
        sharding = jax.sharding.make_single_device_sharding(
            self.device, memory_kind=self.host_memory_kind
        )
        return jax.device_put(tree, sharding)

    def host_expert(self, expert: int) -> Any:
        """The host copy of one expert (leaves without the E axis; a list over L per layer)."""
        return self._host[expert][0] if self.layer_axis is None else self._host[expert]

    def slot_of(self, expert: int) -> int | None:
        return self._slot.get(expert)

    def expert_in(self, slot: int) -> int | None:
        e = self._expert_in[slot]
        return None if e < 0 else e

    def load(self, expert: int, slot: int, *, block: bool = False) -> None:
        """Copy `expert` from host into device `slot`, evicting its occupant. Async unless block."""
        if not 0 <= expert < self.num_experts:
            raise ValueError(f"expert id {expert} out of range [0, {self.num_experts})")
        if not 0 <= slot < self.capacity:
            raise ValueError(f"slot {slot} out of range [0, {self.capacity})")
        t0 = time.perf_counter() if block else 0.0
        on_device = jax.device_put(self._host[expert], self._device_sharding)  # [P] trees
        index = jnp.int32(slot)
        for p, part in enumerate(on_device):  # layer order: layer 0 lands first
            self._slots[p] = _set_slot_donated(self._slots[p], part, index)
        self._assign(expert, slot)
        self.bytes_moved += self.bytes_per_expert
        if block:
            jax.block_until_ready(self._slots)
            self.load_time_s += time.perf_counter() - t0

    def _assign(self, expert: int, slot: int) -> None:
        old = self._expert_in[slot]
        if old >= 0:
            del self._slot[old]
        if expert in self._slot:  # an expert lives in one slot at a time
            self._expert_in[self._slot[expert]] = -1
        self._expert_in[slot], self._slot[expert] = expert, slot
        self.loads += 1

    def load_layer(self, expert: int, slot: int, layer: int) -> None:
        """Copy one layer of `expert` into `slot` (per-layer stores only), asynchronously.

        For an engine that streams a step layer by layer; the slot counts as holding `expert`
        (`slot_of`, `loads`) once its last layer is loaded."""
        if self.layer_axis is None:
            raise ValueError("load_layer needs a per-layer store (layer_axis set)")
        part = jax.device_put(self._host[expert][layer], self._device_sharding)
        self._slots[layer] = _set_slot_donated(self._slots[layer], part, jnp.int32(slot))
        self.bytes_moved += sum(x.nbytes for x in jax.tree.leaves(self._host[expert][layer]))
        if layer == len(self._slots) - 1:
            self._assign(expert, slot)

    def preload(self, experts: list[int] | None = None, *, block: bool = True) -> None:
        """Fill slots 0.. with `experts` (default: the first C experts)."""
        experts = list(range(min(self.capacity, self.num_experts))) if experts is None else experts
        if len(experts) > self.capacity:
            raise ValueError(f"cannot preload {len(experts)} experts into {self.capacity} slots")
        for slot, e in enumerate(experts):
            self.load(e, slot, block=False)
        if block:
            self.wait()

    def wait(self) -> float:
        """Block until every issued load has landed; returns the seconds spent waiting."""
        t0 = time.perf_counter()
        jax.block_until_ready(self.slots)
        return time.perf_counter() - t0

    def gather(self, experts: list[int]) -> Any:
        """Device weights for `experts` (leaves [len, ...]); every one must be resident."""
        missing = [e for e in experts if e not in self._slot]
        if missing:
            raise KeyError(f"experts {missing} are not resident in the device slots")
        return _gather(self.slots, jnp.asarray([self._slot[e] for e in experts], jnp.int32))
