"""What launch/serve.py and launch/generate.py --moe serve when given no checkpoint: the newest
trained Read-ME run of the default config (real saved tiny models), else an untrained conversion
that says so in its model id."""

import json
import os
import time

from readme_jax.checkpoints import models
from readme_jax.serve.bench.models import UNTRAINED_NAME, default_model, default_trained_run
from readme_jax.testing import tiny_readme


def _run(root, name, config_name="smollm2_135m", checkpoint="", trained=True, age=0.0):
    run = root / name
    run.mkdir(parents=True)
    cfg = {"name": config_name, "model": {"checkpoint": checkpoint}}
    (run / "config.json").write_text(json.dumps(cfg))
    m = tiny_readme()
    sub = run / ("moe_trained" if trained else "moe_init")
    models.save_readme(sub, m.params, m.rc, m.spec, m.meta)
    t = time.time() - age
    os.utime(sub, (t, t))
    return sub


def test_no_trained_run_means_untrained_and_named_so(tmp_path):
    _run(tmp_path, "only_init", trained=False)
    _run(tmp_path, "other_config", config_name="tiny")
    _run(tmp_path, "other_model", checkpoint="some/hf_dir")
    found, line, name = default_model(tmp_path)
    assert found is None and name == UNTRAINED_NAME and "UNTRAINED" in line


def test_newest_trained_run_of_the_default_config_is_served(tmp_path):
    _run(tmp_path, "old", age=100.0)
    new = _run(tmp_path, "new", age=1.0)
    _run(tmp_path, "not_default", config_name="tiny")  # newer, but another config
    assert default_trained_run(tmp_path) == new
    found, line, name = default_model(tmp_path)
    assert found == new and name == "readme-new" and str(new) in line
    assert models.discover(found).kind == "readme_moe"
