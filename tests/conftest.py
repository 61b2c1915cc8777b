import os

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

# The longest files first (summed test durations of a full run, longest first), so that the
# two xdist workers (`--dist loadfile` hands out whole files in collection order) end together
# instead of one running a long file alone at the end. Files not listed keep their order after
# these; a missing or renamed file only loses its place.
LONGEST_FIRST = (
    "test_eval_harness.py",
    "test_quant.py",
    "test_multiprocess.py",
    "test_moe.py",
    "test_train_mesh.py",
    "test_train_loop.py",
    "test_smollm2.py",
    "test_serve_http.py",
    "test_load_faults.py",
    "test_serve_profile.py",
    "test_config_validation.py",
    "test_data_chat.py",
)


def pytest_collection_modifyitems(config, items):
    rank = {name: i for i, name in enumerate(LONGEST_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))  # stable: files stay whole
