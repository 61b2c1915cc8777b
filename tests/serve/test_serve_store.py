"""Offloaded expert store: pinned-host placement, slot loads, capacity, NumPy fallback, int8
experts."""

import jax
import numpy as np
import pytest

from readme_jax.model import quant
from readme_jax.serve.cache import ExpertCache, make_policy, split_waves
from readme_jax.serve.store import OffloadedExpertStore, memory_kinds

E, L, D, F, C = 5, 2, 4, 6, 3


def make_experts():
    rng = np.random.default_rng(0)
    return {
        "w_gate_up": rng.standard_normal((E, L, D, 2, F)).astype(np.float32),
        "w_down": rng.standard_normal((E, L, F, D)).astype(np.float32),
    }


def assert_slot_holds(store, experts, slot, e):
    for name in experts:
        np.testing.assert_array_equal(np.asarray(store.slots[name][slot]), experts[name][e])


@pytest.mark.skipif(
    "pinned_host" not in memory_kinds(jax.devices()[0]), reason="backend has no pinned_host"
)
def test_host_experts_live_in_pinned_host_memory_and_slots_on_device():
    store = OffloadedExpertStore(make_experts(), C)
    assert store.host_memory_kind == "pinned_host"
    for leaf in jax.tree.leaves(store.host_expert(2)):
        assert leaf.sharding.memory_kind == "pinned_host"
    for leaf in jax.tree.leaves(store.slots):
        assert leaf.sharding.memory_kind == "device" and leaf.shape[0] == C


@pytest.mark.parametrize("host_kind", ["pinned_host", None])
def test_load_copies_the_expert_into_its_slot(host_kind):
    experts = make_experts()
    store = OffloadedExpertStore(experts, C, host_memory_kind=host_kind)
    store.load(4, 1)
    store.load(2, 0, block=True)
    store.wait()
    assert_slot_holds(store, experts, 1, 4)
    assert_slot_holds(store, experts, 0, 2)
    assert store.slot_of(4) == 1 and store.expert_in(2) is None
    per_expert = sum(x[0].nbytes for x in experts.values())
    assert store.bytes_per_expert == per_expert and store.bytes_moved == 2 * per_expert
    assert store.load_time_s > 0
    got = store.gather([2, 4])
    np.testing.assert_array_equal(np.asarray(got["w_down"]), experts["w_down"][[2, 4]])


def test_capacity_is_respected_and_a_reload_evicts_the_occupant():
    experts = make_experts()
    store = OffloadedExpertStore(experts, C)
    store.preload()
    assert [store.expert_in(s) for s in range(C)] == [0, 1, 2]
    store.load(3, 1)
    assert store.slot_of(1) is None and store.slot_of(3) == 1
    assert_slot_holds(store, experts, 1, 3)
    with pytest.raises(ValueError, match="slot 3 out of range"):
        store.load(0, C)
    with pytest.raises(ValueError, match="expert id 5"):
        store.load(E, 0)
    with pytest.raises(KeyError, match=r"\[1\]"):
        store.gather([1])
    with pytest.raises(ValueError, match="same leading expert axis"):
        OffloadedExpertStore({"a": np.zeros((2, 3)), "b": np.zeros((3, 3))}, 2)


def test_store_follows_cache_decisions_with_prefetch():
    experts = make_experts()
    store = OffloadedExpertStore(experts, C)
    cache = ExpertCache(C, E, make_policy("belady"), bytes_per_expert=store.bytes_per_expert)
    steps = [[0, 1], [2], [3, 0], [4, 1, 2], [0], [3]]
    for t, step in enumerate(steps):
        future = [e for s in steps[t + 1 :] for e in s]
        for d in cache.run_step(step, future, step=t):
            if d.needs_load:
                store.load(d.expert, d.slot)
            assert store.slot_of(d.expert) == d.slot
        if t + 1 < len(steps):
            last = split_waves(step, C)[-1]
            for ld in cache.prefetch(last, steps[t + 1], future[len(steps[t + 1]) :], step=t):
                store.load(ld.expert, ld.slot)
    store.wait()
    for e in cache.resident:
        assert_slot_holds(store, experts, cache.slot_of(e), e)
    assert store.bytes_moved == cache.stats.bytes_moved


def test_load_donates_the_slot_buffer_and_inflight_compute_sees_old_weights():
    experts = make_experts()
    store = OffloadedExpertStore(experts, C)
    store.preload()
    compute = jax.jit(lambda slots: slots["w_down"][1].sum() + 0 * slots["w_gate_up"].sum())
    old = store.slots["w_down"]
    out = compute(store.slots)  # dispatched, maybe still running
    store.load(4, 1)  # overwrites the slot that compute reads
    assert old.is_deleted()  # donated: no full-buffer copy per load
    np.testing.assert_allclose(float(out), experts["w_down"][1].sum(), rtol=1e-5)
    np.testing.assert_allclose(float(compute(store.slots)), experts["w_down"][4].sum(), rtol=1e-5)


def test_per_layer_store_loads_every_layer_into_its_own_buffer():
    experts = make_experts()
    store = OffloadedExpertStore(experts, C, layer_axis=1)
    assert isinstance(store.slots, list) and len(store.slots) == L
    assert store.slots[0]["w_down"].shape == (C, F, D)
    store.load(3, 2, block=True)
    for l in range(L):
        for name in experts:
            np.testing.assert_array_equal(np.asarray(store.slots[l][name][2]), experts[name][3, l])
    assert store.bytes_per_expert == sum(x[0].nbytes for x in experts.values())
    with pytest.raises(ValueError, match="same layer axis"):
        OffloadedExpertStore({"a": np.zeros((2, 3, 4)), "b": np.zeros((2, 4))}, 1, layer_axis=1)


@pytest.mark.parametrize("host_kind", ["pinned_host", None])
def test_int8_expert_round_trips_through_the_store(host_kind):
    rng = np.random.default_rng(1)
    Dq, Fq = 32, 48  # wide enough that the f32 scales are a small part of an expert's bytes
    experts = {
        "gate_up": rng.standard_normal((E, L, Dq, 2, Fq)).astype(np.float32),
        "down": rng.standard_normal((E, L, Fq, Dq)).astype(np.float32),
    }
    q = quant.quantize_experts(experts, "int8")
    store = OffloadedExpertStore(q, 2, layer_axis=1, host_memory_kind=host_kind)
    store.load(3, 1, block=True)
    for l in range(L):
        for name in experts:
            w = store.slots[l][name]
            assert isinstance(w, quant.QWeight) and w.q.qvalue.dtype == np.int8
            np.testing.assert_array_equal(np.asarray(w.q.qvalue[1]), q[name].q.qvalue[3, l])
            np.testing.assert_array_equal(np.asarray(w.q.scale[1]), q[name].q.scale[3, l])
            # what lands in the slot dequantizes to the f32 expert within half a step
            err = np.abs(np.asarray(quant.dequantize(w[1])) - experts[name][3, l])
            assert np.all(err <= np.asarray(w.q.scale[1]) * (0.5 + 1e-4))
    values = sum(x[3].size for x in experts.values())  # one byte per weight
    scales = L * (2 * Fq + Dq) * 4  # f32, per layer and output channel
    assert store.bytes_per_expert == values + scales
    f32 = sum(x[3].nbytes for x in experts.values())
    assert 3.5 < f32 / store.bytes_per_expert < 4
    store.load(0, 0)
    assert store.bytes_moved == store.loads * store.bytes_per_expert == 2 * (values + scales)
    got = store.gather([0, 3])[0]["down"]  # per-layer store: one tree per layer
    assert got.shape == (2, Fq, Dq) and got.q.qvalue.dtype == np.int8
