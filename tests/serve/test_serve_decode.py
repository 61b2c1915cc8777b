"""Jitted slot prefill/decode of the Read-ME MoE: equal to full recompute, chunking- and
offload-invariant (bitwise), per-request sampling."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from readme_jax.decode.steps import SlotState
from readme_jax.model.readme import readme_forward
from readme_jax.model.sampling import sample_rows
from readme_jax.serve import decode as dec
from readme_jax.serve.store import OffloadedExpertStore
from readme_jax.testing import tiny_serve_model

N, T, Q = 4, 64, 8  # shared by the serve tests, so the compiled steps are reused
GREEDY = (0.0, 0, 1.0, 0, 0)


@pytest.fixture(scope="module")
def model():
    return tiny_serve_model(num_experts=4, seed=0)


def _full_params(sm):
    """The {"backbone", "router"} params of a ServeParams, for the reference forward."""
    sp = sm.params
    layers = [
        {
            **{k: np.asarray(v) for k, v in lp.items()},
            "expert_gate_up": sp.experts["gate_up"][:, l],
            "expert_down": sp.experts["down"][:, l],
        }
        for l, lp in enumerate(sp.backbone["layers"])
    ]
    stacked = {k: np.stack([lp[k] for lp in layers]) for k in layers[0]}
    return {"backbone": {**sp.backbone, "layers": stacked}, "router": sp.router}


def _waves(experts, weights, groups, slot_of=lambda e: e, loads=()):
    """Per wave: slot ids, weights zeroed outside the wave, and its loads."""
    out = []
    for i, g in enumerate(groups):
        inside = np.isin(experts, g)
        sl = np.asarray([[slot_of(e) if e in g else 0 for e in row] for row in experts])
        out.append((sl, np.where(inside, weights, 0.0), loads[i] if loads else []))
    return out


def _prefill(d, slots, row, prompt, experts, weights, cuts, split=False):
    """Prefill `prompt` into `row` in chunks ending at `cuts` (all experts resident); with
    `split`, one wave per expert. Returns the last chunk's output."""
    start = 0
    for end in [*cuts, len(prompt)]:
        if end <= start:
            continue
        e, w = experts[start:end], weights[start:end]
        groups = [[x] for x in np.unique(e)] if split else [np.unique(e).tolist()]
        last = end == len(prompt)
        chunk = dec.PromptChunk(row, start, prompt[start:end], last, GREEDY)
        out = d.prefill(slots, chunk, _waves(e, w, groups))
        start = end
    return [np.asarray(x) for x in out]


def _greedy(d, slots, row, prompt, n, cuts=(), slot_map=lambda e: e):
    """Greedy tokens and their experts for one request in slot `row` (all experts resident)."""
    pe, pw = d.route_prompt(prompt)
    tok, e, w = _prefill(d, slots, row, prompt, pe, pw, cuts)
    toks, exps = [int(tok)], [int(e[0])]
    for i in range(1, n):
        tk, sl = np.zeros(N, np.int32), np.zeros((N, 1), np.int32)
        wt, act = np.zeros((N, 1), np.float32), np.zeros(N, bool)
        tk[row], sl[row, 0], wt[row], act[row] = toks[-1], slot_map(exps[-1]), w, True
        sp = (np.zeros(N), np.zeros(N), np.ones(N), np.zeros(N), np.full(N, i))
        t, e, w = (np.asarray(x) for x in d.decode(slots, SlotState(tk, sl, wt, act, sp)))
        toks.append(int(t[row]))
        exps.append(int(e[row, 0]))
        w = w[row]
    return toks, exps


@pytest.mark.parametrize("source", ["slots", "in_graph"])
def test_decode_with_kv_cache_equals_full_recompute(model, source):
    """Both expert sources of the step library: slot buffers, and the in-graph experts in the
    Generator's decode layout (all resident: slot ids are expert ids)."""
    d = dec.SlotDecoder(model.params, N, T, Q)
    prompt = list(np.random.default_rng(1).integers(3, 97, 13))
    slots = dec.resident_slots(model.params.experts) if source == "slots" else None
    toks, exps = _greedy(d, slots, 2, prompt, 10, cuts=(8,))
    params, ids = _full_params(model), list(prompt)
    rc = model.params.rc
    # causal: right-padding to one shape changes nothing at the real positions
    fwd = jax.jit(lambda p, t: readme_forward(p, t, rc))
    pad = lambda ids: jnp.asarray([ids + [0] * (32 - len(ids))])
    for _ in range(10):
        logits, aux = fwd(params, pad(ids))
        ids.append(int(jnp.argmax(logits[0, len(ids) - 1])))
    assert toks == ids[len(prompt) :]
    # each returned expert is the router's choice for that token, given the whole sequence
    _, aux = fwd(params, pad(ids))
    want = np.asarray(aux["routing"][0][0, len(prompt) : len(ids), 0])
    assert exps == want.tolist()


def test_prefill_chunking_waves_and_slot_row_do_not_change_a_bit(model):
    sp = model.params
    slots = dec.resident_slots(sp.experts)
    prompt = list(np.random.default_rng(2).integers(3, 97, 20))
    a, b = dec.SlotDecoder(sp, N, T, Q), dec.SlotDecoder(sp, N, T, Q)
    pe, pw = a.route_prompt(prompt)
    _prefill(a, slots, 1, prompt, pe, pw, cuts=(8, 16))
    _prefill(b, slots, 3, prompt, pe, pw, cuts=(1, 2, 7, 11, 13, 19), split=True)
    stack = lambda layers: np.stack([np.asarray(x) for x in layers])  # per-layer KV lists
    for key in ("k", "v"):
        np.testing.assert_array_equal(
            stack(a.cache[key])[:, 1, :20], stack(b.cache[key])[:, 3, :20]
        )
        np.testing.assert_array_equal(
            stack(a.rcache[key])[:, 1, :21], stack(b.rcache[key])[:, 3, :21]
        )
    assert int(a.cache["lengths"][1]) == int(b.cache["lengths"][3]) == 20
    assert int(a.rcache["lengths"][1]) == 21  # the router is one token ahead
    assert int(a.cache["lengths"][0]) == 0  # other slots untouched


def test_offloaded_slot_decode_equals_all_resident(model):
    sp = model.params
    prompt = list(np.random.default_rng(3).integers(3, 97, 11))
    want = _greedy(
        dec.SlotDecoder(sp, N, T, Q), dec.resident_slots(sp.experts), 0, prompt, 8, cuts=(8,)
    )
    # C = 2 slots in a store: every chunk streams its experts in waves of 2, layer by layer
    store = OffloadedExpertStore(sp.experts, 2, layer_axis=1)
    d = dec.SlotDecoder(sp, N, T, Q)
    pe, pw = d.route_prompt(prompt)
    for start, end in ((0, 8), (8, len(prompt))):
        e, w = pe[start:end], pw[start:end]
        groups = [list(g) for g in np.array_split(np.unique(e)[::-1], -(-len(np.unique(e)) // 2))]
        loads = [[(x, s) for s, x in enumerate(g)] for g in groups]
        slot_of = {x: s for g in groups for s, x in enumerate(g)}.__getitem__
        toks = d.prefill(
            lambda l: store.slots[l],
            dec.PromptChunk(0, start, prompt[start:end], end == len(prompt), GREEDY),
            _waves(e, w, groups, slot_of, loads),
            load_layer=store.load_layer,
        )
    assert store.loads == sum(len(np.unique(pe[a:b])) for a, b in ((0, 8), (8, 11)))
    assert max(len(np.unique(pe[a:b])) for a, b in ((0, 8), (8, 11))) > 2  # really in waves
    tok, e, w = (np.asarray(x) for x in toks)
    out, exps = [int(tok)], [int(e[0])]
    for i in range(1, 8):
        store.load(exps[-1], 1)
        tk, sl = np.zeros(N, np.int32), np.zeros((N, 1), np.int32)
        tk[0], sl[0, 0] = out[-1], 1
        wt, act = np.zeros((N, 1), np.float32), np.zeros(N, bool)
        wt[0], act[0] = w, True
        sp_n = (np.zeros(N), np.zeros(N), np.ones(N), np.zeros(N), np.full(N, i))
        t, e, w = (np.asarray(x) for x in d.decode(store.slots, SlotState(tk, sl, wt, act, sp_n)))
        out.append(int(t[0]))
        exps.append(int(e[0, 0]))
        w = w[0]
    assert (out, exps) == want


def test_per_request_sampling_depends_only_on_the_request():
    rng = np.random.default_rng(0)
    logits = jnp.asarray(rng.standard_normal((4, 50)), jnp.float32)
    temp = jnp.asarray([0.0, 1.0, 1.0, 1.0])
    topk = jnp.asarray([0, 0, 1, 5])
    topp = jnp.asarray([1.0, 1.0, 1.0, 0.9])
    seed = jnp.asarray([0, 7, 7, 7], jnp.uint32)
    f = jax.jit(sample_rows)
    draws = [np.asarray(f(logits, temp, topk, topp, seed, jnp.full(4, c))) for c in range(30)]
    greedy = np.asarray(jnp.argmax(logits, -1))
    assert all(d[0] == greedy[0] and d[2] == greedy[2] for d in draws)  # temp 0, top_k 1
    assert len({int(d[1]) for d in draws}) > 3  # really samples
    # row 1 alone, same seed and counter: the same tokens
    alone = [
        int(f(logits[1:2], temp[1:2], topk[1:2], topp[1:2], seed[1:2], jnp.full(1, c))[0])
        for c in range(30)
    ]
    assert alone == [int(d[1]) for d in draws]
    top5 = set(np.argsort(-np.asarray(logits[3]))[:5].tolist())
    assert all(int(d[3]) in top5 for d in draws)


def test_split_params_rejects_layerwise_models(model):
    rc = model.params.rc
    rc = rc.replace(moe=dataclasses.replace(rc.moe, layerwise=True))
    with pytest.raises(ValueError, match="pre-gating"):
        dec.split_params(rc, {"backbone": {}, "router": {}})
