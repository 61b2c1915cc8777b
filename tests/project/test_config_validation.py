"""Config errors are caught before any work, each in one line naming the key, the value and the
allowed range: unknown keys (with a "did you mean"), out-of-range values, a port the server
cannot listen on, and a run directory that holds no model yet (described, not parsed)."""

import socket
import subprocess
import sys
from pathlib import Path

import pytest

from readme_jax import cli
from readme_jax.checkpoints import models
from readme_jax.checkpoints.errors import CheckpointError
from readme_jax.model.config import ConfigError
from readme_jax.refactor.pipeline import Recipe
from readme_jax.serve.server import check_listen

ROOT = Path(__file__).resolve().parents[2]
RUN_CONFIG = ROOT / "configs/smollm2_135m.py"


def run_config(**over):
    c = cli._defaults(RUN_CONFIG)
    for key, v in over.items():
        node, leaf = key.split("__")
        c[node][leaf] = v
    return c


def test_an_unknown_key_is_one_line_with_the_near_key():
    defaults = cli._defaults(RUN_CONFIG)
    cli.check_keys(["--config.refactor.remain_rate=0.3", "--config.resume=False"], defaults)
    cases = [
        ("--config.refactor.remain_rat=0.3", "did you mean 'refactor.remain_rate'?"),
        ("--config.remain_rate=0.3", "did you mean 'refactor.remain_rate'?"),  # missing prefix
        ("--noconfig.resum", "did you mean 'resume'?"),
        ("--config.nonexistent=3", "--help lists the settings"),
    ]
    for arg, hint in cases:
        with pytest.raises(ConfigError) as e:
            cli.check_keys(["--config.seed=1", arg], defaults, "configs/smollm2_135m.py")
        msg = str(e.value)
        assert "\n" not in msg and msg.endswith(hint) and arg in msg, msg
    with pytest.raises(ConfigError, match="did you mean 'port'"):
        cli.parse_config(ROOT / "configs/serve.py", ["--config.prot=8001"])


def test_out_of_range_values_name_the_key_the_value_and_the_range():
    Recipe.from_config(run_config())  # the defaults are valid
    cases = [
        (
            {"refactor__remain_rate": 1.5},
            "refactor.remain_rate=1.5 is out of range: allowed (0, 1]",
        ),
        ({"refactor__remain_rate": 0.0}, "refactor.remain_rate=0.0 is out of range"),
        ({"calib__num_sequences": 0}, "calib.num_sequences=0 is out of range: allowed >= 1"),
        ({"moe__dispatch": "fast"}, "moe.dispatch='fast' is out of range: allowed one of"),
        ({"router__dim": 130}, "router.dim=130 is out of range: allowed a multiple of n_heads"),
    ]
    for over, msg in cases:
        with pytest.raises(ConfigError) as e:
            Recipe.from_config(run_config(**over))
        assert str(e.value).startswith(msg) and "\n" not in str(e.value), str(e.value)
    with pytest.raises(ConfigError, match="remain_rate=2 is out of range"):
        Recipe(remain_rate=2).check()  # the serving path names its own key


def test_a_port_the_server_cannot_listen_on_is_refused():
    for port in (99999, 0, -1):
        with pytest.raises(ConfigError, match=f"port={port} is out of range: allowed 1-65535"):
            check_listen("127.0.0.1", port)
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        with pytest.raises(ConfigError, match=f"cannot listen on 127.0.0.1:{port}"):
            check_listen("127.0.0.1", port)
    check_listen("127.0.0.1", port)  # free again


def test_a_run_directory_without_a_model_is_described(tmp_path):
    run = tmp_path / "run"
    (run / "calib").mkdir(parents=True)
    (run / "calib/stats.json").write_text("{}")
    (run / "config.json").write_text('{"stages": "calibrate,refactor", "model": {}}')
    with pytest.raises(CheckpointError) as e:
        models.discover(run)
    msg = str(e.value)
    assert "holds calibration statistics (calib/) only" in msg and "run the refactor stage" in msg
    (tmp_path / "empty_run").mkdir()
    (tmp_path / "empty_run/config.json").write_text('{"stages": "calibrate"}')
    with pytest.raises(CheckpointError, match="run the calibrate stage"):
        models.discover(tmp_path / "empty_run")
    assert models.describe_run(ROOT / "tests/fixtures/load_llama2") is None  # an HF directory


def _launch(script: str, *args: str) -> subprocess.CompletedProcess:
    # a bound, not a timing: a hang (as uvicorn did on port 99999) fails the test
    cmd = [sys.executable, str(ROOT / "launch" / script), *args]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=120, cwd=ROOT)


def test_launch_scripts_stop_on_a_bad_value_in_one_line_before_any_work(tmp_path):
    run = tmp_path / "run"
    r = _launch("train.py", "--config.refactor.remain_rate=1.5", f"--config.run_dir={run}")
    assert r.returncode == 1 and "Traceback" not in r.stderr, r.stderr
    assert r.stderr.strip().splitlines()[-1].startswith("error: refactor.remain_rate=1.5")
    assert not run.exists()  # nothing ran: no run directory, no calibration
    r = _launch("serve.py", "--config.checkpoint=tiny", "--config.port=99999")
    assert r.returncode == 1 and "Traceback" not in r.stderr, r.stderr
    assert r.stderr.strip() == "error: port=99999 is out of range: allowed 1-65535"
