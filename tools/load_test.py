"""Load test of the HTTP server: a bursty trace of streamed completions, every request accounted
for.

  python launch/serve.py --config.port=8000 &                 # the server under test
  python tools/load_test.py --url http://127.0.0.1:8000 --num_requests 1000 --rate 2 --cv 3

Trace (`readme_jax.serve.bench.trace`): gamma inter-arrival gaps of mean 1/rate and coefficient of
variation `cv` (>1: bursty); prompts cut from held-out (validation split) documents of
`--domains` with the bundled SmolLM2 tokenizer, `--prompt_len lo,hi` tokens (uniform); output
lengths lognormal(median, sigma 0.6) clipped to [4, max] (`--output_len median,max`).
Every request is sent as token ids with temperature 0 and `stream: true`; a 429 or 503 answer is
retried after its Retry-After, until it completes. The client counts: completed, lost (never
completed), duplicated (completed more than once), 5xx other than 503, and checks the server's
own counters (/metrics) against its own. Reports throughput (completion tokens per second of
makespan), time to first token and normalized latency (end-to-end latency / completion tokens)
at p50/p95/p99 (latencies from each request's arrival time, retries included).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import re
import sys
import time
from pathlib import Path

import httpx
import numpy as np

from readme_jax.checkpoints.tokenizer import load_tokenizer
from readme_jax.serve.bench.trace import LengthDist, heldout_prompts, make_trace


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--url", default="http://127.0.0.1:8000")
    p.add_argument("--num_requests", type=int, default=1000)
    p.add_argument("--rate", type=float, default=2.0, help="mean arrivals per second")
    p.add_argument("--cv", type=float, default=3.0, help="coefficient of variation of gaps")
    p.add_argument("--prompt_len", default="16,64", help="lo,hi prompt tokens (uniform)")
    p.add_argument("--output_len", default="16,64", help="median,max new tokens (lognormal)")
    p.add_argument("--domains", default="fiction,drama,code_docs,manual")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--timeout_s", type=float, default=600.0, help="per attempt")
    p.add_argument("--label", default="", help="name of this run in the output")
    p.add_argument("--out", default="", help="append the JSON summary to this file")
    return p.parse_args(argv)


async def one_request(client: httpx.AsyncClient, url: str, req, model: str, t0: float, stats):
    """Send one trace request (retrying on 429/503) and time it; returns its record."""
    await asyncio.sleep(max(0.0, t0 + req.arrival_s - time.perf_counter()))
    body = {
        "model": model,
        "prompt": [int(t) for t in req.prompt_tokens],
        "max_tokens": int(req.max_new_tokens),
        "temperature": 0,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    rec = {"id": req.id, "attempts": 0, "rejected": 0, "completions": 0, "errors": []}
    while True:
        rec["attempts"] += 1
        async with client.stream("POST", f"{url}/v1/completions", json=body) as r:
            if r.status_code in (429, 503):
                rec["rejected"] += 1
                stats["rejected_" + str(r.status_code)] += 1
                await r.aread()
                await asyncio.sleep(float(r.headers.get("retry-after", "1")))
                continue
            if r.status_code != 200:
                rec["errors"].append(r.status_code)
                stats["5xx" if r.status_code >= 500 else "4xx"] += 1
                await r.aread()
                return rec
            first, usage, done = None, None, False
            async for line in r.aiter_lines():
                if not line.startswith("data: "):
                    continue
                if line == "data: [DONE]":
                    done = True
                    break
                ev = json.loads(line[6:])
                if "error" in ev:
                    rec["errors"].append(ev["error"]["message"])
                if ev.get("choices") and first is None:
                    first = time.perf_counter()
                usage = ev.get("usage") or usage
            end = time.perf_counter()
        if done and usage is not None and not rec["errors"]:
            rec["completions"] += 1
            arrive = t0 + req.arrival_s
            rec |= {"ttft_s": first - arrive, "latency_s": end - arrive, "end": end}
            rec["tokens"] = usage["completion_tokens"]
        return rec


def scrape(url: str) -> dict[str, float]:
    text = httpx.get(f"{url}/metrics", timeout=30).text
    pat = re.compile(r'^readme_requests_total\{status="(\w+)"\} ([0-9.e+]+)$', re.M)
    out = {k: float(v) for k, v in pat.findall(text)}
    m = re.search(r"^readme_generated_tokens_total ([0-9.e+]+)$", text, re.M)
    out["generated_tokens"] = float(m.group(1)) if m else float("nan")
    return out


def pct(xs, q) -> float:
    return float(np.percentile(xs, q)) if len(xs) else float("nan")


def summarize(recs, trace, t0, before, after, args, model) -> dict:
    done = [r for r in recs if r["completions"] >= 1]
    toks = sum(r["tokens"] for r in done)
    span = max(r["end"] for r in done) - t0 if done else float("nan")
    ttft = [r["ttft_s"] for r in done]
    norm = [r["latency_s"] / max(1, r["tokens"]) for r in done]
    delta = {k: after.get(k, 0) - before.get(k, 0) for k in after}
    return {
        "label": args.label,
        "model": model,
        "requests": len(trace),
        "completed": len(done),
        "lost": len(trace) - len(done),
        "duplicated": sum(r["completions"] > 1 for r in recs),
        "errors_5xx_non_503": sum(1 for r in recs for e in r["errors"] if e != 503),
        "rejected_then_retried": sum(r["rejected"] for r in recs),
        "server_ok": delta.get("ok"),
        "server_rejected": delta.get("rejected"),
        "server_generated_tokens": delta.get("generated_tokens"),
        "completion_tokens": toks,
        "makespan_s": span,
        "throughput_tok_s": toks / span if done else 0.0,
        "ttft_s": {f"p{q}": pct(ttft, q) for q in (50, 95, 99)},
        "norm_latency_s_per_tok": {f"p{q}": pct(norm, q) for q in (50, 95, 99)},
        "trace": {
            "rate": args.rate,
            "cv": args.cv,
            "prompt_len": args.prompt_len,
            "output_len": args.output_len,
            "domains": args.domains,
            "seed": args.seed,
            "last_arrival_s": trace[-1].arrival_s,
        },
        "command": "python tools/load_test.py " + " ".join(sys.argv[1:]),
    }


async def run(args) -> dict:
    lo, hi = (int(x) for x in args.prompt_len.split(","))
    med, mx = (int(x) for x in args.output_len.split(","))
    tok = load_tokenizer()
    prompts = heldout_prompts(tok, args.domains.split(","), hi, seed=args.seed)
    out_len = LengthDist("lognormal", median=med, sigma=0.6, lo=min(4, mx), hi=mx)
    trace = make_trace(
        prompts,
        args.num_requests,
        args.rate,
        cv=args.cv,
        output_len=out_len,
        prompt_len=LengthDist("uniform", lo=lo, hi=hi),
        seed=args.seed,
    )
    model = httpx.get(f"{args.url}/v1/models", timeout=30).json()["data"][0]["id"]
    before = scrape(args.url)
    stats = {"rejected_429": 0, "rejected_503": 0, "5xx": 0, "4xx": 0}
    limits = httpx.Limits(max_connections=None, max_keepalive_connections=64)
    async with httpx.AsyncClient(timeout=args.timeout_s, limits=limits) as client:
        t0 = time.perf_counter()
        recs = await asyncio.gather(
            *(one_request(client, args.url, r, model, t0, stats) for r in trace)
        )
    return summarize(recs, trace, t0, before, scrape(args.url), args, model)


def main(argv=None) -> dict:
    args = parse_args(argv)
    res = asyncio.run(run(args))
    print(json.dumps(res, indent=2))
    if args.out:
        with Path(args.out).open("a") as f:
            f.write(json.dumps(res) + "\n")
    return res


if __name__ == "__main__":
    main()
