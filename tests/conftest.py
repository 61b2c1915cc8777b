import collections
import json
import os
import sys
from pathlib import Path

# 8 fake CPU devices for the sharding tests; must be set before JAX initialises. Appended, so an
# XLA_FLAGS that is set (even empty, e.g. exported by make) still gets the device count.
_FLAG = "--xla_force_host_platform_device_count"
if _FLAG not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + f" {_FLAG}=8").strip()
# XLA:CPU's LLVM backend at -O0: the suite's tiny models spend most of their time compiling, and
# -O0 compiles them about a third faster with no measured loss in the SmolLM2 tests' run time
# (tests/train/test_train_losses.py + model/test_moe.py 308 -> 206 s of CPU; test_smollm2.py +
# test_eval_multiple_choice.py 215 -> 177 s). Processes launched by the tests inherit it.
if "--xla_backend_optimization_level" not in os.environ["XLA_FLAGS"]:
    os.environ["XLA_FLAGS"] += " --xla_backend_optimization_level=0"
os.environ.setdefault("JAX_PLATFORMS", "cpu")
# Bytecode where PYTHONDONTWRITEBYTECODE is set (as in some sandboxes and CI images): without
# it, every process the suite starts (xdist workers, the launch/ scripts, servers, the
# multi-process runs) compiles the source of JAX and its dependencies again, ~3.5 s of CPU each
# (launch/train.py stopping at a bad setting: 5.2 -> 1.8 s). It goes to a prefix directory in
# .pytest_cache (git-ignored), so nothing is written next to any source; an explicit
# PYTHONPYCACHEPREFIX is kept.
if os.environ.get("PYTHONDONTWRITEBYTECODE") and not os.environ.get("PYTHONPYCACHEPREFIX"):
    _PYC = Path(__file__).resolve().parents[1] / ".pytest_cache" / "pycache"
    del os.environ["PYTHONDONTWRITEBYTECODE"]
    os.environ["PYTHONPYCACHEPREFIX"] = str(_PYC)
    sys.dont_write_bytecode, sys.pycache_prefix = False, str(_PYC)

# Order of the files for xdist's `--dist loadfile` (it hands out whole files in collection order
# when run with `--no-loadscope-reorder`, as `make test` does): the longest first, so that the
# workers end together instead of one running a long file alone at the end. The seconds per file
# come from the previous run, kept in pytest's cache (.pytest_cache) by the hooks below, over
# tests/durations.json (`make test-durations` writes it from that cache, for fresh clones); files
# without a record (a new file) go first, by test count (xdist's own order).
_SECONDS_KEY = "readme_jax/seconds_per_file"
_DURATIONS = Path(__file__).parent / "durations.json"
_seconds: dict[str, float] = {}


def _file(nodeid: str) -> str:
    return nodeid.split("::", 1)[0]


def pytest_collection_modifyitems(config, items):
    cache = getattr(config, "cache", None)  # None under -p no:cacheprovider
    committed = json.loads(_DURATIONS.read_text()) if _DURATIONS.exists() else {}
    seconds = {**committed, **(cache.get(_SECONDS_KEY, {}) if cache is not None else {})}
    count = collections.Counter(_file(item.nodeid) for item in items)

    def rank(item):
        f = _file(item.nodeid)
        return (f in seconds, -seconds.get(f, 0.0), -count[f])

    items.sort(key=rank)  # stable: a file's tests stay together, in their order


def pytest_runtest_logreport(report):
    # on the xdist controller, every worker's reports (setup, call and teardown) arrive here
    _seconds[_file(report.nodeid)] = _seconds.get(_file(report.nodeid), 0.0) + report.duration


def pytest_sessionfinish(session, exitstatus):
    cache = getattr(session.config, "cache", None)
    is_worker = hasattr(session.config, "workerinput")
    if cache is None or is_worker or not _seconds or exitstatus not in (0, 1):
        return  # 0: passed, 1: some failed; not interrupted runs (their files are cut short)
    cache.set(_SECONDS_KEY, {**cache.get(_SECONDS_KEY, {}), **_seconds})
