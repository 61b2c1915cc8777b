"""`--help` of the config-driven launch scripts lists their settings and exits 0."""

import subprocess
import sys
from pathlib import Path

import pytest

from readme_jax import cli

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize("flag", ["--help", "-h"])
def test_parse_config_help_prints_every_setting_and_exits_0(flag, capsys):
    with pytest.raises(SystemExit) as e:
        cli.parse_config(ROOT / "configs/serve.py", ["--config.port=1", flag])
    assert e.value.code == 0
    out = capsys.readouterr().out
    assert "--config.KEY=VALUE" in out and "c.engine.capacity = 2" in out and "c.port" in out


def test_a_launch_script_answers_help_without_loading_a_model():
    r = subprocess.run(
        [sys.executable, str(ROOT / "launch/serve.py"), "--help"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert r.returncode == 0, r.stderr
    assert r.stdout.startswith("OpenAI-compatible HTTP server") and "c.max_queue" in r.stdout
