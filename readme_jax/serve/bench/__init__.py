"""The serving lab: benchmarks, simulation and reports built on the serving runtime.

  trace.py      request traces (arrivals, prompt and output lengths; JSONL)
  costmodel.py  accelerator cost model and CostClock (simulated step times), CPU fit
  replay.py     offline cache runs (run_cache, simulate), cache logs, replay_check
  run.py        the benchmark grid on the real engine and on simulated accelerators
  report.py     results.json and the serving tables of report.md (on eval/report.py's helpers)

The lab imports the runtime (`serve/*.py`), `eval/` and `refactor/`; the runtime never imports
the lab.
"""
