#!/usr/bin/env bash
# The 1,000-request load tests of docs/logbook/http-server.md §6b against a trained run (RUN, default
# runs/smollm2_135m from make demo): Read-ME expert-aware, dense, Read-ME decode-prioritized;
# one server at a time (started, loaded, stopped with SIGTERM). Results: OUT/results.jsonl.
set -u
cd "$(dirname "$0")/.."
RUN=${RUN:-runs/smollm2_135m}
OUT=${OUT:-docs/load}
mkdir -p $OUT
PORT=8717
TRACE="--num_requests 1000 --rate 2.5 --cv 3 --prompt_len 16,32 --output_len 8,16"
one() {  # label, server args...
  label=$1; shift
  .venv/bin/python launch/serve.py --config.port=$PORT --config.engine.max_len=256 --config.max_queue=64 "$@" > $OUT/$label.server.log 2>&1 &
  pid=$!
  for i in $(seq 1 300); do curl -sf http://127.0.0.1:$PORT/health > /dev/null && break; sleep 1; done
  echo "[$(date +%T)] $label: server up"
  .venv/bin/python tools/load_test.py --url http://127.0.0.1:$PORT $TRACE --label $label --out $OUT/results.jsonl > $OUT/$label.client.log 2>&1
  echo "[$(date +%T)] $label: client rc=$?"
  curl -s http://127.0.0.1:$PORT/metrics > $OUT/$label.metrics.txt
  kill -TERM $pid; wait $pid; echo "[$(date +%T)] $label: server exit $?"
}
one moe_expert --config.checkpoint=$RUN --config.engine.capacity=0 --config.engine.batching=expert
one dense --config.dense=True --config.engine.batching=expert
one moe_decode --config.checkpoint=$RUN --config.engine.capacity=0 --config.engine.batching=decode
