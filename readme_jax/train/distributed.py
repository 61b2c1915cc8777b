"""Multi-process (multi-controller) runs: one JAX program on many hosts, one mesh over them all.

Every process runs the same `launch/train.py`; `jax.distributed.initialize` joins them, and the
(data, fsdp, expert) mesh of train/mesh.py then spans every device of every process. What this
module adds to the single-process path:

  initialize(c)         join the processes (explicit coordinator, or JAX's auto-detection on
                        TPU pods, SLURM and Open MPI), before any JAX computation
  describe()            process index/count, global/local device counts, platform (logged at start)
  is_primary()          process 0: the one that writes logs, metrics, reports and saved models
  put_global(tree, sh)  host values that every process holds identically -> global arrays
  to_host(tree)         global arrays -> numpy on every process (all processes must call it)
  barrier(name)         wait for every process (no-op with one process)
  assert_same(v, name)  check that a host value is identical on every process

The input pipeline gives each process its own rows (data/pipeline.py shards by process index)
and `mesh.global_batch` assembles them with `jax.make_array_from_process_local_data`; orbax
checkpoints are written and restored by all processes together (train/checkpoint.py).

Config keys (`c.distributed`, all optional):
  coordinator       "host:port" of process 0's coordinator; "" = auto-detect (or one process)
  num_processes     0 = auto-detect
  process_id        -1 = auto-detect
  cpu_devices       CPU devices per process (jax_num_cpu_devices); 0 = JAX's default
  init_timeout_s    how long to wait for the other processes at start
Source: JAX "Introduction to multi-controller JAX" and `jax.distributed.initialize` docs.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from pathlib import Path
from typing import Any

import jax
import numpy as np
from jax.experimental import multihost_utils

from readme_jax.errors import UserError

# environment variables by which JAX's cluster auto-detection recognises a multi-process launch
# (jax/_src/clusters: slurm_cluster.py, ompi_cluster.py, cloud_tpu_cluster.py)
_SLURM = ("SLURM_JOB_ID", "SLURM_STEP_NODELIST", "SLURM_NTASKS", "SLURM_PROCID", "SLURM_LOCALID")
_OMPI = ("OMPI_MCA_orte_hnp_uri", "OMPI_COMM_WORLD_SIZE")
_TPU = ("TPU_WORKER_HOSTNAMES", "TPU_ACCELERATOR_TYPE", "CLOUD_TPU_TASK_ID", "TPU_WORKER_ID")


class DistributedError(UserError, RuntimeError):
    """The processes could not be joined; the message says which setting to check."""


@dataclasses.dataclass(frozen=True)
class DistributedConfig:
    coordinator: str = ""
    num_processes: int = 0
    process_id: int = -1
    cpu_devices: int = 0
    init_timeout_s: int = 300

    @classmethod
    def from_config(cls, c: Any) -> DistributedConfig:
        d = c.distributed if "distributed" in c else {}
        kw = {f.name: d[f.name] for f in dataclasses.fields(cls) if f.name in d}
        out = cls(**kw)
        out.validate()
        return out

    def validate(self) -> None:
        explicit = bool(self.coordinator)
        if explicit and self.coordinator.rpartition(":")[2].isdigit() is False:
            raise DistributedError(
                f"distributed.coordinator must be host:port, got {self.coordinator!r}"
            )
        if explicit and (self.num_processes < 1 or not 0 <= self.process_id < self.num_processes):
            raise DistributedError(
                "with distributed.coordinator set, give distributed.num_processes >= 1 and "
                f"0 <= distributed.process_id < num_processes (got {self.num_processes}, "
                f"{self.process_id})"
            )


def detected_cluster() -> str:
    """The multi-process environment JAX would auto-detect ("tpu", "slurm", "ompi") or ""."""
    env = os.environ
    if all(k in env for k in _SLURM) and int(env.get("SLURM_NTASKS", "1")) > 1:
        return "slurm"
    if any(k in env for k in _OMPI) and int(env.get("OMPI_COMM_WORLD_SIZE", "1")) > 1:
        return "ompi"
    if any(k in env for k in _TPU) or Path("/dev/accel0").exists() or Path("/dev/vfio/0").exists():
        return "tpu"
    return ""


def initialize(c: Any) -> str:
    """Join the processes of a multi-process run; returns how ("explicit", "tpu", "slurm",
    "ompi", "multihost" or "" for a single process). Call before any other JAX call: JAX
    fixes its devices at the first one. Raises DistributedError when the join fails."""
    d = DistributedConfig.from_config(c)
    if d.cpu_devices:
        jax.config.update("jax_num_cpu_devices", int(d.cpu_devices))
    how = "explicit" if d.coordinator else detected_cluster()
    if not how and bool(c.get("multihost", False)):
        how = "multihost"
    if not how:
        return ""
    # CPU collectives across processes (the default on recent JAX; set for older ones)
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    kw: dict[str, Any] = {"initialization_timeout": int(d.init_timeout_s)}
    if d.coordinator:
        kw.update(
            coordinator_address=d.coordinator,
            num_processes=int(d.num_processes),
            process_id=int(d.process_id),
        )
    try:
        jax.distributed.initialize(**kw)
    except Exception as e:
        raise DistributedError(
            f"jax.distributed.initialize ({how}) failed: {type(e).__name__}: {str(e)[:300]}. "
            "Check distributed.coordinator (reachable host:port of process 0), "
            "num_processes and process_id, or the cluster's environment"
        ) from e
    return how


def describe() -> dict[str, Any]:
    """Where this process stands: index, count, device counts and platform."""
    return {
        "process_index": jax.process_index(),
        "process_count": jax.process_count(),
        "global_devices": jax.device_count(),
        "local_devices": jax.local_device_count(),
        "platform": jax.devices()[0].platform,
    }


def is_primary() -> bool:
    return jax.process_index() == 0


def barrier(name: str) -> None:
    """Wait until every process reaches the barrier `name` (no-op with one process)."""
    if jax.process_count() > 1:
        multihost_utils.sync_global_devices(name)


def assert_same(value: Any, name: str) -> None:
    """Raise DistributedError unless the JSON-able `value` is identical on every process."""
    if jax.process_count() == 1:
        return
    digest = hashlib.sha256(json.dumps(value, sort_keys=True, default=str).encode()).digest()
    mine = np.frombuffer(digest, np.uint8)
    every = np.asarray(multihost_utils.process_allgather(mine))
    if not (every == mine[None]).all():
        raise DistributedError(f"{name} differs between processes")


def put_global(tree: Any, shardings: Any) -> Any:
    """Host values (numpy or single-device arrays), identical on every process, -> global
    arrays with the given shardings; each process fills only its own devices' shards.
    A fresh copy even where the input is already a jax.Array (the train step donates)."""

    def one(x, sh):
        if isinstance(x, jax.Array) and x.sharding.is_equivalent_to(sh, x.ndim):
            return jax.device_put(x, sh, may_alias=False)
        host = np.asarray(x)
        return jax.make_array_from_callback(host.shape, sh, lambda idx: host[idx])

    return jax.tree.map(one, tree, shardings)


def to_host(tree: Any) -> Any:
    """Global arrays -> numpy (the whole value) on every process. Every process must call it
    (the gather is a collective); single-process arrays come back as they are."""
    if jax.process_count() == 1:
        return jax.device_get(tree)

    def one(x):
        if not isinstance(x, jax.Array) or x.is_fully_addressable or x.is_fully_replicated:
            return np.asarray(x)
        return np.asarray(multihost_utils.process_allgather(x, tiled=True))

    return jax.tree.map(one, tree)
