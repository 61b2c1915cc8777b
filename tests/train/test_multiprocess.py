"""Multi-process training on loopback: 2 processes x 4 CPU devices run `launch/train.py` on the
tiny config with one 8-device mesh over both. Their losses must equal a single-process 8-device
run of the same steps: a run on the data=2, expert=4 mesh whose two processes are both SIGKILLed
resumes, on the fsdp=2, expert=4 mesh, from the checkpoint they wrote together and goes on with
the same losses (one kill-and-resume covers both meshes: three launches in all).

Every child has a timeout; when one fails or a deadline passes, all children are killed."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from train_helpers import _domains

pytestmark = pytest.mark.multiprocess

ROOT = Path(__file__).resolve().parents[2]
TIMEOUT_S = 600  # per launch, all processes together
STEPS = 4  # one round: 2 router + 2 expert steps, a checkpoint after each phase
# The teacher: the tiny config's shape (dim 32, 2 layers) as a Hugging Face directory with its own
# 420-token BPE vocabulary, so the steps' vocabulary-wide losses stay small (the tiny config's
# random teacher takes SmolLM2's 49,152-token vocabulary).
TEACHER = ROOT / "tests" / "fixtures" / "load_smollm2"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _env(devices: int | None) -> dict[str, str]:
    """The suite's environment with the device count replaced (kept: conftest's -O0 flag)."""
    env = {k: v for k, v in os.environ.items() if k != "JAX_NUM_CPU_DEVICES"}
    env.update(JAX_PLATFORMS="cpu", PYTHONPATH=str(ROOT), PYTHONUNBUFFERED="1")
    flags = [f for f in env.get("XLA_FLAGS", "").split() if "device_count" not in f]
    if devices:
        flags.append(f"--xla_force_host_platform_device_count={devices}")
    env["XLA_FLAGS"] = " ".join(flags)
    return env


def _args(run: Path, data: dict, stages: str, mesh: dict) -> list[str]:
    a = [sys.executable, str(ROOT / "launch" / "train.py"), "--config", "configs/tiny.py",
         f"--config.model.checkpoint={TEACHER}", f"--config.run_dir={run}",
         f"--config.stages={stages}",
         "--config.data.domains=" + ",".join(f"{k}={v}" for k, v in data["domains"].items()),
         f"--config.data.cache={data['cache']}", "--config.train.rounds=1",
         "--config.train.save_router_snapshot=False", "--config.train.num_threads=1"]  # fmt: skip
    return a + [f"--config.mesh.{k}={v}" for k, v in mesh.items()]


class Procs:
    """Child processes (each in its own session) with logs; all are killed on any failure."""

    def __init__(self, cmds: list[list[str]], envs: list[dict], logs: list[Path]):
        self.logs = logs
        self.procs = [
            subprocess.Popen(
                c,
                cwd=ROOT,
                env=e,
                stdout=f.open("w"),
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )  # fmt: skip
            for c, e, f in zip(cmds, envs, logs, strict=True)
        ]
        self.deadline = time.monotonic() + TIMEOUT_S

    def kill(self) -> None:
        for p in self.procs:
            if p.poll() is None:
                os.killpg(p.pid, signal.SIGKILL)
        for p in self.procs:
            p.wait()

    def tails(self) -> str:
        return "\n".join(f"--- {f}\n" + f.read_text()[-3000:] for f in self.logs)

    def wait(self, until=None) -> str:
        """Wait for all to exit 0 ("done") or for until() to hold ("until"); else kill all and
        fail with the logs."""
        try:
            while True:
                codes = [p.poll() for p in self.procs]
                if any(c not in (None, 0) for c in codes):
                    pytest.fail(f"a process exited with {codes}\n{self.tails()}")
                if all(c == 0 for c in codes):
                    return "done"
                if until is not None and until():
                    return "until"
                if time.monotonic() > self.deadline:
                    pytest.fail(f"timed out after {TIMEOUT_S}s\n{self.tails()}")
                time.sleep(0.05)
        finally:
            self.kill()


def _launch(run: Path, data: dict, mesh: dict, tag: str, until=None) -> str:
    port = _free_port()
    cmds, envs, logs = [], [], []
    for i in range(2):
        dist = {"coordinator": f"127.0.0.1:{port}", "num_processes": 2, "process_id": i,
                "cpu_devices": 4, "init_timeout_s": 120}  # fmt: skip
        cmds.append(_args(run, data, "train", mesh)
                    + [f"--config.distributed.{k}={v}" for k, v in dist.items()])  # fmt: skip
        envs.append(_env(None))
        logs.append(run.parent / f"{run.name}.{tag}.p{i}.log")
    return Procs(cmds, envs, logs).wait(until)


def _losses(run: Path) -> dict[int, float]:
    lines = (run / "train" / "readme" / "metrics.jsonl").read_text().splitlines()
    return {r["step"]: r["loss"] for r in map(json.loads, lines)}


def _copy_refactored(src: Path, dst: Path) -> None:
    for sub in ("moe_init", "calib"):
        shutil.copytree(src / sub, dst / sub)


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """The single-process 8-device run: calibrate, refactor and train (also fills the token
    cache that the multi-process runs read)."""
    root = tmp_path_factory.mktemp("mp")
    data = {"domains": _domains(root), "cache": str(root / "cache")}
    run = root / "ref"
    log = root / "ref.log"
    cmd = _args(run, data, "calibrate,refactor,train", {"data": 2, "fsdp": 1, "expert": 4})
    Procs([cmd], [_env(8)], [log]).wait()
    assert "process_count=1, global_devices=8" in log.read_text()
    losses = _losses(run)
    assert sorted(losses) == list(range(1, STEPS + 1))
    return root, data, run, losses


def _assert_same_losses(got: dict, want: dict) -> None:
    assert sorted(got) == sorted(want)
    for k in want:
        assert got[k] == pytest.approx(want[k], rel=2e-5, abs=1e-6), (k, got[k], want[k])


def test_two_processes_killed_and_resumed_on_another_mesh_match_one_process(reference):
    """Both processes SIGKILLed mid-run on the data=2, expert=4 mesh; resumed on fsdp=2,
    expert=4 (orbax restores onto the new mesh's shardings): the losses of both meshes equal
    the single-process run's."""
    root, data, ref, want = reference
    run = root / "mp_resume"
    _copy_refactored(ref, run)
    ckpt = run / "train" / "readme" / "ckpt"
    # SIGKILL both once the router phase's checkpoint (step 2) is complete: they are then
    # compiling or running the expert phase
    mesh = {"data": 2, "fsdp": 1, "expert": 4}
    how = _launch(run, data, mesh, "killed", until=lambda: (ckpt / "2").is_dir())
    assert how == "until", "the run finished before it could be killed"
    assert not (run / "moe_trained").exists()
    log0 = (root / f"{run.name}.killed.p0.log").read_text()
    log1 = (root / f"{run.name}.killed.p1.log").read_text()
    assert "process_index=0, process_count=2, global_devices=8, local_devices=4" in log0
    assert "process_index=1, process_count=2, global_devices=8, local_devices=4" in log1
    assert "[train]" in log0 and "[train]" not in log1  # process 0 alone logs
    mesh = {"data": 1, "fsdp": 2, "expert": 4}
    assert _launch(run, data, mesh, "resumed") == "done"
    log0 = (root / f"{run.name}.resumed.p0.log").read_text()
    assert "resumed from step 2" in log0
    _assert_same_losses(_losses(run), want)
    assert (run / "moe_trained" / "model.json").exists()
    assert (run / "train" / "summary.json").exists()


def test_distributed_config_errors_and_cluster_detection(monkeypatch):
    from readme_jax.train import distributed as dist

    cfg = dist.DistributedConfig
    with pytest.raises(dist.DistributedError, match="host:port"):
        cfg(coordinator="localhost").validate()
    with pytest.raises(dist.DistributedError, match="process_id"):
        cfg(coordinator="127.0.0.1:1234", num_processes=2, process_id=2).validate()
    cfg(coordinator="127.0.0.1:1234", num_processes=2, process_id=1).validate()
    for k in (*dist._SLURM, *dist._OMPI, *dist._TPU):
        monkeypatch.delenv(k, raising=False)
    if not (Path("/dev/accel0").exists() or Path("/dev/vfio/0").exists()):
        assert dist.detected_cluster() == ""
    slurm = dict(zip(dist._SLURM, ("7", "node[1-2]", "2", "0", "0"), strict=True))
    for k, v in slurm.items():
        monkeypatch.setenv(k, v)
    assert dist.detected_cluster() == "slurm"
    monkeypatch.setenv("SLURM_NTASKS", "1")  # one task: nothing to join
    assert dist.detected_cluster() != "slurm"


def test_launch_rejects_a_bad_coordinator_in_one_line():
    proc = subprocess.run(
        [sys.executable, str(ROOT / "launch" / "train.py"), "--config", "configs/tiny.py",
         "--config.distributed.coordinator=nohost", "--config.distributed.num_processes=2",
         "--config.distributed.process_id=0"],
        cwd=ROOT, env=_env(None), capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert proc.returncode != 0
    assert "error: distributed.coordinator must be host:port, got 'nohost'" in proc.stderr
    assert "Traceback" not in proc.stderr
