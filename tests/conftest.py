import os

# 8 fake CPU devices for the sharding tests; must be set before JAX initialises. Appended, so an
# XLA_FLAGS that is set (even empty, e.g. exported by make) still gets the device count.
_FLAG = "--xla_force_host_platform_device_count"
if _FLAG not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + f" {_FLAG}=8").strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")
