"""HTTP server (loopback only): the official openai client gets completions and streams; greedy
outputs over HTTP equal offline generation under several batching and cache policies with
requests in flight at once; bad input gets its status code while the server keeps serving; an
unimplemented request field gets a 400 naming it; a full queue gets 429 + a Retry-After that
grows with the queue; a client disconnect frees its slot; an engine fault fails one request
alone; an engine failure fails the requests in flight, turns /health 503 and stops the server
with an error; SIGTERM drains within its bound; the lookahead counters reach /metrics (and a
backend without them does not break it); logprobs and echo (openai client; prompt scores equal
an independent forward; streamed equal non-streamed; greedy tokens are the top-1).

One tiny random Read-ME model (2 layers, width 32) with the bundled SmolLM2 tokenizer; every
server has the same N, context and C, so the compiled steps are shared."""

import json
import signal
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from types import SimpleNamespace

import httpx
import jax
import jax.numpy as jnp
import numpy as np
import openai
import pytest

from readme_jax.checkpoints.tokenizer import load_tokenizer
from readme_jax.decode.generator import greedy_by_reforward
from readme_jax.model import llama
from readme_jax.model.readme import readme_forward
from readme_jax.model.sampling import SamplingParams
from readme_jax.serve.backend import ModelBackend, ReplayBackend
from readme_jax.serve.dense import dense_serve_params
from readme_jax.serve.engine import Engine, EngineConfig, RequestResult, generate
from readme_jax.serve.http import ServerState, retry_after_estimate
from readme_jax.serve.metrics import ServeMetrics
from readme_jax.serve.server import _GracefulServer, build_server, free_port, run_server
from readme_jax.serve.textstream import TextStream
from readme_jax.serve.worker import EngineFailed, EngineWorker
from readme_jax.testing import np_init, tiny_llama_config, tiny_readme, tiny_serve_model

N, T, Q, C = 2, 128, 16, 2
NAME = "tiny"
PROMPTS = [
    "Once upon a time, in a small village,",
    "The function returns a list of",
    "Press the power button for",
    "To be, or not to be:",
]


def ecfg(**kw) -> EngineConfig:
    base = dict(num_slots=N, max_len=T, prefill_chunk=Q, max_batch_tokens=32, capacity=C)
    return EngineConfig(**{**dict(batching="expert", cache_policy="belady"), **base, **kw})


@pytest.fixture(scope="module")
def model():
    return tiny_serve_model(num_experts=4, seed=0, vocab=49152)


@pytest.fixture(scope="module")
def tok():
    return load_tokenizer()


class SlowBackend(ModelBackend):
    """The real backend, with each decode step delayed (so a request stays in flight), a fault
    on prompts holding POISON (one request's failure), and every decode step failing once
    `broken` is set (the engine's failure, as a lost device would give)."""

    POISON = 13

    def __init__(self, sp, cfg, delay_s=0.0):
        super().__init__(sp, cfg.num_slots, cfg.max_len, cfg.prefill_chunk)
        self.delay_s = delay_s
        self.broken = threading.Event()

    def route_prompt(self, req):
        if self.POISON in req.prompt:
            raise RuntimeError("injected fault")
        return super().route_prompt(req)

    def decode(self, rows, slot_NxA, w_NxA, lookahead=False):
        time.sleep(self.delay_s)
        if self.broken.is_set():
            raise RuntimeError("injected device fault")
        return super().decode(rows, slot_NxA, w_NxA, lookahead=lookahead)


def start(model, tok, cfg=None, delay_s=0.0, **kw):
    cfg = cfg or ecfg()
    srv = build_server(
        model.params,
        tok,
        cfg,
        model_name=NAME,
        backend=SlowBackend(model.params, cfg, delay_s),
        **kw,
    )
    return srv, srv.start_in_thread()


@pytest.fixture(scope="module")
def server(model, tok):
    srv, url = start(model, tok)
    yield url
    srv.stop()


def offline(model, tok, prompts, max_new, **kw):
    ids = [tok.encode(p) for p in prompts]
    out = generate(
        model.params,
        ids,
        max_new,
        capacity=C,
        cache_policy="lru",
        max_len=T,
        num_slots=N,
        prefill_chunk=Q,
        **kw,
    )
    return [tok.decode(t, skip_special=True) for t in out.tokens], [len(t) for t in out.tokens]


def complete(url, **body):
    return httpx.post(f"{url}/v1/completions", json={"model": NAME, **body}, timeout=60)


def test_openai_client_completion_and_streamed_chat(server, model, tok):
    cl = openai.OpenAI(base_url=f"{server}/v1", api_key="none", max_retries=0)
    assert [m.id for m in cl.models.list().data] == [NAME]
    full = cl.completions.create(model=NAME, prompt=PROMPTS[0], max_tokens=12, temperature=0)
    text = full.choices[0].text
    assert full.usage.completion_tokens == 12 and full.choices[0].finish_reason == "length"
    assert full.usage.prompt_tokens == len(tok.encode(PROMPTS[0]))
    assert text == offline(model, tok, PROMPTS[:1], 12)[0][0]
    pieces = [
        c.choices[0].text
        for c in cl.completions.create(
            model=NAME, prompt=PROMPTS[0], max_tokens=12, temperature=0, stream=True
        )
    ]
    assert len(pieces) > 3 and "".join(pieces) == text
    msgs = [{"role": "user", "content": "Name a colour."}]
    chat = cl.chat.completions.create(model=NAME, messages=msgs, max_tokens=10, temperature=0)
    stream = cl.chat.completions.create(
        model=NAME,
        messages=msgs,
        max_tokens=10,
        temperature=0,
        stream=True,
        stream_options={"include_usage": True},
    )
    chunks = list(stream)
    got = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert got == chat.choices[0].message.content and got
    assert chunks[-1].usage.completion_tokens == chat.usage.completion_tokens
    chat_ids = tok.encode(tok.apply_chat_template(msgs))
    assert chat.usage.prompt_tokens == len(chat_ids)


def test_raw_sse_ends_with_done(server):
    body = {"model": NAME, "prompt": PROMPTS[1], "max_tokens": 5, "temperature": 0, "stream": True}
    with httpx.stream("POST", f"{server}/v1/completions", json=body, timeout=60) as r:
        assert r.headers["content-type"].startswith("text/event-stream")
        lines = [x for x in r.iter_lines() if x]
    assert lines[-1] == "data: [DONE]" and all(x.startswith("data: ") for x in lines)


@pytest.mark.parametrize(
    "batching,policy", [("expert", "belady"), ("decode", "lru"), ("prefill", "random")]
)
def test_concurrent_greedy_over_http_equals_offline(model, tok, batching, policy):
    srv, url = start(model, tok, ecfg(batching=batching, cache_policy=policy, prefetch=True))
    try:
        with ThreadPoolExecutor(len(PROMPTS) + 1) as pool:
            futs = [
                pool.submit(complete, url, prompt=p, max_tokens=10 + 3 * i, temperature=0)
                for i, p in enumerate(PROMPTS)
            ]
            sampled = pool.submit(
                complete, url, prompt=PROMPTS[2], max_tokens=8, temperature=0.9, top_p=0.9, seed=7
            )
            got = [f.result().json() for f in futs]
            samp = sampled.result().json()
    finally:
        srv.stop()
    for i, (p, g) in enumerate(zip(PROMPTS, got, strict=True)):
        texts, lens = offline(model, tok, [p], 10 + 3 * i)
        assert g["choices"][0]["text"] == texts[0], (batching, policy, i)
        assert g["usage"]["completion_tokens"] == lens[0]
    ref = offline(model, tok, PROMPTS[2:3], 8, sampling=SamplingParams(0.9, 0, 0.9), seed=7)[0][0]
    assert samp["choices"][0]["text"] == ref
    assert srv.worker.metrics.hits._value.get() + srv.worker.metrics.misses._value.get() > 0


BAD = [
    ('{"prompt": "x", "max_tokens": 4', 400, "malformed JSON"),
    ({"prompt": "x", "max_tokens": "many"}, 400, "max_tokens"),
    ({"prompt": "x", "temperature": -0.5}, 400, "temperature"),
    ({"prompt": "x", "top_p": 1.5}, 400, "top_p"),
    ({"prompt": "x", "top_p": 0}, 400, "top_p"),
    ({"prompt": "x", "n": 3}, 400, "n must be 1"),
    ({"prompt": "word " * 200, "max_tokens": 4}, 400, f"context is {T} tokens"),
    ({"prompt": "x", "max_tokens": T}, 400, f"context of {T} tokens"),
    ({"prompt": [5, 10**6]}, 400, "outside the vocabulary"),
    ({"prompt": "x", "model": "gpt-4o"}, 404, "does not exist"),
    ({"messages": []}, 400, "messages"),
]


def test_bad_inputs_get_their_status_and_the_server_keeps_serving(server):
    for body, code, needle in BAD:
        path = (
            "chat/completions" if isinstance(body, dict) and "messages" in body else "completions"
        )
        kw = {"content": body} if isinstance(body, str) else {"json": body}
        r = httpx.post(f"{server}/v1/{path}", headers={"content-type": "application/json"}, **kw)
        assert r.status_code == code, (body, r.text)
        err = r.json()["error"]
        assert needle in err["message"] and err["type"] == "invalid_request_error", err
        ok = complete(server, prompt=PROMPTS[3], max_tokens=3, temperature=0)
        assert ok.status_code == 200 and ok.json()["usage"]["completion_tokens"] == 3


UNSUPPORTED = [  # (endpoint, extra body, the fields the 400 names)
    ("completions", {"best_of": 2}, ["best_of"]),
    ("completions", {"suffix": "x"}, ["suffix"]),
    ("completions", {"logit_bias": {"5": 10}}, ["logit_bias"]),
    ("completions", {"presence_penalty": 0.5}, ["presence_penalty"]),
    ("completions", {"max_token": 4}, ["max_token"]),  # a typo is not silently the default
    ("completions", {"stream": True, "stream_options": {"x": True}}, ["stream_options.x"]),
    (
        "chat/completions",
        {"frequency_penalty": 0.1, "parallel_tool_calls": True},
        ["frequency_penalty", "parallel_tool_calls"],
    ),  # fmt: skip
    ("chat/completions", {"response_format": {"type": "json_object"}}, ["response_format"]),
    ("chat/completions", {"tools": []}, ["tools"]),
    (
        "chat/completions",
        {"messages": [{"role": "user", "content": "x", "name": "a"}]},
        ["messages.0.name"],
    ),
]


def test_unsupported_request_fields_get_a_400_naming_the_field(server):
    for path, extra, fields in UNSUPPORTED:
        msgs = [{"role": "user", "content": "x"}]
        base = {"prompt": "x"} if path == "completions" else {"messages": msgs}
        r = httpx.post(
            f"{server}/v1/{path}", json={"model": NAME, "max_tokens": 2, **base, **extra}
        )
        assert r.status_code == 400, (extra, r.text)
        err = r.json()["error"]
        assert err["param"] in fields and all(repr(f) in err["message"] for f in fields), err
        assert "not supported" in err["message"] and err["type"] == "invalid_request_error"
        if "." not in fields[0]:  # a top-level field: the message lists what is supported
            assert "max_tokens" in err["message"] and "temperature" in err["message"]
    ok = complete(server, prompt="x", max_tokens=2, user="u-1", stream_options=None)
    assert ok.status_code == 200 and ok.json()["usage"]["completion_tokens"] == 2


def test_stop_strings_cut_the_text(server):
    full = complete(server, prompt=PROMPTS[0], max_tokens=12, temperature=0).json()
    text = full["choices"][0]["text"]
    stop = text[len(text) // 2 : len(text) // 2 + 3]
    got = complete(server, prompt=PROMPTS[0], max_tokens=12, temperature=0, stop=[stop]).json()
    assert got["choices"][0]["text"] == text[: text.index(stop)]
    assert got["choices"][0]["finish_reason"] == "stop"


def test_text_stream_holds_back_a_possible_stop_string(tok):
    ids = tok.encode("Hello world, this is a test of stop strings.")
    ts = TextStream(tok, ["is a"])
    pieces = [ts.add(t) for t in ids]
    pieces.append(ts.finish())
    assert ts.stopped and "".join(pieces) == "Hello world, this " == ts.text
    ts2 = TextStream(tok, [])
    assert "".join([ts2.add(t) for t in ids] + [ts2.finish()]) == tok.decode(ids)


def test_full_queue_429_and_disconnect_frees_the_slot(model, tok):
    srv, url = start(model, tok, delay_s=0.05, max_queue=0)
    long = {"model": NAME, "prompt": PROMPTS[0], "max_tokens": 100, "temperature": 0}
    post = lambda c: c.stream("POST", f"{url}/v1/completions", json=long | {"stream": True})
    try:
        with httpx.Client(timeout=60) as ca, httpx.Client(timeout=60) as cb:
            with post(ca) as ra, post(cb) as rb:
                ia, ib = ra.iter_lines(), rb.iter_lines()
                next(ia), next(ib)  # both requests hold a slot
                busy = complete(url, prompt="hi", max_tokens=2)
                assert busy.status_code == 429 and busy.headers["retry-after"] == "1"
                assert busy.json()["error"]["type"] == "rate_limit_error"
                ra.close()  # client A goes away after its first chunk
                t0, rejected = time.monotonic(), 1
                while (r := complete(url, prompt="hi", max_tokens=2)).status_code == 429:
                    rejected += 1  # the cancellation lands between engine steps
                    assert time.monotonic() - t0 < 3, "the slot was not freed"
                    time.sleep(0.05)
                assert r.status_code == 200
                # B (100 steps of >= 50 ms) is still streaming: A's slot was freed
                assert srv.worker.outstanding == 1
                rest = [x for x in ib if x]
        assert rest[-1] == "data: [DONE]" and '"finish_reason": "length"' in rest[-2]
        m = httpx.get(f"{url}/metrics").text
        assert 'readme_requests_total{status="cancelled"} 1.0' in m
        assert f'readme_requests_total{{status="rejected"}} {float(rejected)}' in m
        names = ("time_to_first_token_seconds", "inter_token_latency_seconds", "queue_length")
        names += ("unique_experts_per_step", "expert_cache_bytes_moved_total", "tokens_per_second")
        names += ("lookahead_hits_total", "lookahead_dropped_total", "retry_after_seconds")
        assert all(f"readme_{n}" in m for n in names)
        # C = 2 of 4 experts: no lookahead step; the counters follow the backend's own
        ahead = srv.worker.engine.backend.lookahead_stats
        assert f"readme_lookahead_hits_total {float(ahead['hits'])}" in m
        assert srv.worker.mean_service_s > 0  # the finished requests' service times
    finally:
        srv.stop()


def test_retry_after_grows_with_the_queue_and_the_service_time():
    est = lambda q, n=8, s=2.0: retry_after_estimate(q, n, s, 1, 60)  # noqa: E731
    assert retry_after_estimate(64, 8, None, 1, 60) == 1  # nothing finished yet: the minimum
    assert [est(q) for q in (0, 7, 15, 31, 63)] == [1, 2, 4, 8, 16]
    assert est(16, s=4.0) > est(16, s=2.0) > est(16, n=16, s=2.0)
    assert est(10**4) == 60 and est(0, s=0.01) == 1  # clamped to [min, max]
    assert retry_after_estimate(3, 2, 5.0, 2, 60) == 10
    # the server's 429: requests beyond the slots + the worker's recent mean service time
    worker = SimpleNamespace(engine=SimpleNamespace(cfg=ecfg()), outstanding=N, mean_service_s=None)
    st = ServerState(worker, None, NAME, T, retry_after_s=1, retry_after_max_s=30)
    assert st.busy_retry_after() == 1
    worker.mean_service_s = 3.0
    got = []
    for queued in (0, 4, 16, 64):
        worker.outstanding = N + queued
        got.append(st.busy_retry_after())
    assert got == [2, 8, 26, 30] and got == sorted(got)


class _AheadReplay(ReplayBackend):
    """A replay backend that reports a lookahead hit per decode (as ModelBackend counts)."""

    def __init__(self, *a, **kw):
        super().__init__(*a, **kw)
        self.lookahead_stats = {"hits": 0, "dropped": 0}

    def decode(self, rows, slot_NxA, w_NxA, lookahead=False):
        self.lookahead_stats["hits"] += 1
        return super().decode(rows, slot_NxA, w_NxA, lookahead)


@pytest.mark.parametrize("backend_cls", [ReplayBackend, _AheadReplay])
def test_lookahead_counters_on_metrics(backend_cls):
    rec = RequestResult(0, 3, finish_reason="length", tokens=[5, 6, 7, 8])
    rec.experts, rec.weights = [[i % 4] for i in range(4)], [[1.0]] * 4
    rec.prompt_experts, rec.prompt_weights = [[0]] * 3, [[1.0]] * 3
    be = backend_cls({0: rec}, num_experts=4, num_slots=N)
    worker = EngineWorker(Engine(be, EngineConfig(num_slots=N, max_len=16, prefill_chunk=4)))
    worker.start()
    done = threading.Event()
    worker.submit([1, 2, 3], 4, SamplingParams(), 0, lambda ev: ev[0] == "done" and done.set())
    try:
        assert done.wait(30)
    finally:
        worker.drain(0.0)
        assert worker.join(10)
    m = worker.metrics
    hits = 3.0 if backend_cls is _AheadReplay else 0.0  # 3 decode steps after the prefill
    assert m.ahead_hits._value.get() == hits and m.ahead_dropped._value.get() == 0
    assert worker.mean_service_s is not None
    # deltas between steps; stats that go back (replaced or reset) count from 0 again
    m = ServeMetrics()
    stats = SimpleNamespace(hits=0, misses=0, loads=0, bytes_moved=0)
    for ahead in ({"hits": 2, "dropped": 1}, {"hits": 5, "dropped": 1}, {"hits": 1, "dropped": 0}):
        m.on_step(0.0, 1, None, stats, ahead)
    m.on_step(0.0, 1, None, stats, None)
    text = m.render().decode()
    assert "readme_lookahead_hits_total 6.0" in text
    assert "readme_lookahead_dropped_total 1.0" in text


def test_engine_fault_fails_that_request_alone(server, tok):
    bad = complete(server, prompt=[SlowBackend.POISON, 20, 30], max_tokens=3)
    assert bad.status_code == 500 and "injected fault" in bad.json()["error"]["message"]
    assert complete(server, prompt=PROMPTS[1], max_tokens=3, temperature=0).status_code == 200


def _stream_then_break(url, backend, body):
    """Open a streamed request, read its first chunk, break the backend, read the rest."""
    with httpx.stream("POST", f"{url}/v1/completions", json=body | {"stream": True}) as r:
        it = r.iter_lines()
        next(it)
        backend.broken.set()
        return [x for x in it if x]


def test_engine_failure_fails_in_flight_requests_and_reports_unhealthy(model, tok):
    srv, url = start(model, tok, delay_s=0.05)
    try:
        assert httpx.get(f"{url}/health").status_code == 200
        assert "readme_engine_healthy 1.0" in httpx.get(f"{url}/metrics").text
        body = {"model": NAME, "prompt": PROMPTS[0], "max_tokens": 100, "temperature": 0}
        with ThreadPoolExecutor(1) as pool:  # a second request in flight, not streamed
            other = pool.submit(complete, url, prompt=PROMPTS[0], max_tokens=100, temperature=0)
            while srv.worker.outstanding < 1:
                time.sleep(0.01)
            lines = _stream_then_break(url, srv.worker.engine.backend, body)
            other = other.result()
        assert lines[-1] == "data: [DONE]" and "injected device fault" in lines[-2], lines[-3:]
        assert other.status_code == 500 and "injected device fault" in other.text
        health = httpx.get(f"{url}/health")
        assert health.status_code == 503 and "injected device fault" in health.text
        assert health.json()["error"]["message"].startswith("the engine failed")
        assert "readme_engine_healthy 0.0" in httpx.get(f"{url}/metrics").text
        again = complete(url, prompt=PROMPTS[2], max_tokens=2)
        assert again.status_code == 503 and "the engine failed" in again.json()["error"]["message"]
        assert srv.worker.join(5) and srv.worker.outstanding == 0
    finally:
        srv.stop()


def test_engine_failure_stops_the_server_with_an_error(model, tok):
    cfg = ecfg()
    backend = SlowBackend(model.params, cfg, 0.05)
    srv = build_server(model.params, tok, cfg, model_name=NAME, backend=backend)
    port, raised = free_port(), []

    def serve():
        try:
            run_server(srv, "127.0.0.1", port, 5.0, "warning")
        except EngineFailed as e:
            raised.append(e)

    th = threading.Thread(target=serve)
    th.start()
    while srv.server is None or not srv.server.started:
        time.sleep(0.02)
    body = {"model": NAME, "prompt": PROMPTS[0], "max_tokens": 100, "temperature": 0}
    lines = _stream_then_break(f"http://127.0.0.1:{port}", backend, body)
    assert "injected device fault" in lines[-2]
    th.join(15)
    assert not th.is_alive() and len(raised) == 1 and "injected device fault" in str(raised[0])


def test_sigterm_drains_in_flight_requests_within_the_bound(model, tok):
    cfg = ecfg()
    srv = build_server(
        model.params, tok, cfg, model_name=NAME, backend=SlowBackend(model.params, cfg, 0.05)
    )
    port = free_port()
    th = threading.Thread(target=run_server, args=(srv, "127.0.0.1", port, 0.5, "warning"))
    th.start()
    url = f"http://127.0.0.1:{port}"
    while srv.server is None or not srv.server.started:
        time.sleep(0.02)
    body = {"model": NAME, "prompt": PROMPTS[0], "max_tokens": 100, "temperature": 0}
    with httpx.stream("POST", f"{url}/v1/completions", json=body | {"stream": True}) as r:
        it = r.iter_lines()
        next(it)
        assert isinstance(srv.server, _GracefulServer)
        t0 = time.monotonic()
        srv.server.handle_exit(signal.SIGTERM, None)
        lines = [x for x in it if x]
    assert lines[-1] == "data: [DONE]" and '"finish_reason": "cancelled"' in lines[-2]
    th.join(15)
    assert not th.is_alive() and time.monotonic() - t0 < 10
    assert srv.worker.join(0) and srv.worker.draining
    with pytest.raises(httpx.ConnectError):
        httpx.get(f"{url}/health")


@pytest.mark.slow  # its own compile (~20-60 s on a shared 2-core machine)
def test_dense_model_through_the_engine_equals_dense_greedy():
    cfg = tiny_llama_config()
    params = np_init(llama.param_shapes(cfg), np.random.default_rng(3))
    prompts = [[5, 6, 7, 8, 9], [10, 11, 12], [40, 41, 42, 43, 44, 45, 46]]
    sp = dense_serve_params(cfg, params)
    assert sp.num_experts == 1 and sp.experts["gate_up"].shape[-1] == 1
    out = generate(sp, prompts, 6, max_len=64, num_slots=N, prefill_chunk=Q)
    assert sum(len(t) for t in out.tokens) >= 6
    for p, got in zip(prompts, out.tokens, strict=True):
        ref = greedy_by_reforward(params, cfg, p, 6)
        assert got == ref[: len(got)] and (len(got) == 6 or ref[len(got)] in cfg.eos_ids)


# ----------------------------------------------------------------------------- logprobs


_forward_jit = jax.jit(readme_forward, static_argnums=2)


def _direct_logprobs(ids):
    """log p(ids[j] | ids[:j]) for j >= 1 and the argmax per position, from readme_forward on
    the unsplit model (an independent path: no serving layout, no KV cache)."""
    m = tiny_readme(num_experts=4, seed=0, vocab=49152)
    row = np.zeros((1, -(-len(ids) // 64) * 64), np.int32)  # one width, one compile; causal
    row[0, : len(ids)] = ids
    logits = _forward_jit(m.params, row, m.rc)[0][0, : len(ids)]
    lp = np.asarray(jax.nn.log_softmax(logits.astype(jnp.float32), -1))
    return lp[np.arange(len(ids) - 1), ids[1:]], lp.argmax(-1)


def test_openai_client_echo_with_max_tokens_0_scores_the_prompt(server, tok):
    client = openai.OpenAI(base_url=f"{server}/v1", api_key="none", max_retries=0)
    r = client.completions.create(
        model=NAME, prompt=PROMPTS[0], max_tokens=0, echo=True, logprobs=2, temperature=0
    )
    c = r.choices[0]
    ids = tok.encode(PROMPTS[0])
    lp = c.logprobs
    assert c.text == PROMPTS[0] and r.usage.completion_tokens == 0
    assert len(lp.tokens) == len(ids) and "".join(lp.tokens) == tok.decode(ids)
    assert lp.token_logprobs[0] is None and lp.top_logprobs[0] is None
    want, _ = _direct_logprobs(ids)
    np.testing.assert_allclose(lp.token_logprobs[1:], want, atol=1e-4)
    assert lp.text_offset == [len(tok.decode(ids[:k])) for k in range(len(ids))]
    for chosen, top in zip(lp.token_logprobs[1:], lp.top_logprobs[1:], strict=True):
        assert len(top) <= 2 and max(top.values()) >= chosen - 1e-6


def _stream_completion(server, **body):
    lps, text = {"tokens": [], "token_logprobs": [], "top_logprobs": [], "text_offset": []}, ""
    with httpx.stream("POST", f"{server}/v1/completions", json={"model": NAME, **body}) as r:
        for line in r.iter_lines():
            if line.startswith("data: {"):
                ch = json.loads(line[6:])["choices"][0]
                text += ch["text"]
                for k, v in (ch["logprobs"] or {}).items():
                    lps[k] += v
    return text, lps


def test_greedy_tokens_are_the_top_1_and_streamed_logprobs_equal_non_streamed(server, tok):
    body = dict(prompt=PROMPTS[1], max_tokens=6, temperature=0, logprobs=3, echo=True)
    full = complete(server, **body).json()["choices"][0]
    lp = full["logprobs"]
    n_prompt = len(tok.encode(PROMPTS[1]))
    gen = list(zip(lp["tokens"], lp["token_logprobs"], lp["top_logprobs"], strict=True))
    assert len(gen) == n_prompt + 6
    for t, v, top in gen[n_prompt:]:
        best = max(top, key=top.get)
        assert t == best and v == top[best]
    text, streamed = _stream_completion(server, stream=True, **body)
    assert text == full["text"]
    assert streamed["tokens"] == lp["tokens"] and streamed["text_offset"] == lp["text_offset"]
    assert streamed["token_logprobs"][0] is None
    np.testing.assert_allclose(streamed["token_logprobs"][1:], lp["token_logprobs"][1:], atol=1e-5)
    want, _ = _direct_logprobs(tok.encode(PROMPTS[1]))
    np.testing.assert_allclose(lp["token_logprobs"][1:n_prompt], want, atol=1e-4)


def test_chat_logprobs_and_top_logprobs_streamed_and_not(server):
    client = openai.OpenAI(base_url=f"{server}/v1", api_key="none", max_retries=0)
    msgs = [{"role": "user", "content": "Name a colour."}]
    kw = dict(model=NAME, messages=msgs, max_tokens=5, temperature=0, logprobs=True)
    r = client.chat.completions.create(top_logprobs=3, **kw)
    content = r.choices[0].logprobs.content
    assert len(content) == r.usage.completion_tokens == 5
    assert "".join(e.token for e in content) == r.choices[0].message.content
    for e in content:
        assert len(e.top_logprobs) == 3 and e.top_logprobs[0].token == e.token
        assert e.top_logprobs[0].logprob == e.logprob
    chunks = client.chat.completions.create(top_logprobs=3, stream=True, **kw)
    streamed = [e for ch in chunks if ch.choices and ch.choices[0].logprobs
                for e in ch.choices[0].logprobs.content]  # fmt: skip
    assert [e.token for e in streamed] == [e.token for e in content]
    np.testing.assert_allclose([e.logprob for e in streamed], [e.logprob for e in content],
                               atol=1e-5)  # fmt: skip
    plain = client.chat.completions.create(**kw).choices[0].logprobs.content
    assert all(e.top_logprobs == [] for e in plain)


def test_logprobs_requests_out_of_range_get_a_400(server):
    msgs = [{"role": "user", "content": "x"}]
    cases = [
        ("completions", {"prompt": "x", "max_tokens": 0}, "max_tokens"),
        ("completions", {"prompt": "x", "logprobs": 6}, "logprobs"),
        ("completions", {"prompt": "x", "logprobs": True}, "logprobs"),
        ("chat/completions", {"messages": msgs, "top_logprobs": 2}, "top_logprobs"),
        ("chat/completions", {"messages": msgs, "logprobs": True, "top_logprobs": 21}, "top_"),
    ]
    for path, body, needle in cases:
        r = httpx.post(f"{server}/v1/{path}", json={"model": NAME, **body})
        assert r.status_code == 400 and needle in r.text, (body, r.text)
