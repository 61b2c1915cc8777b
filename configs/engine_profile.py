"""Engine profile config (`launch/engine_profile.py`): Read-ME vs dense through one engine at
saturation, and optionally the FFN alone.

  python launch/engine_profile.py --config.checkpoint=runs/smollm2_135m --config.rounds=2
"""

import importlib.util
import pathlib

from ml_collections import ConfigDict

# the engine block by path: config files are loaded by path, `configs` need not be importable
_spec = importlib.util.spec_from_file_location(
    "readme_jax_configs_engine", pathlib.Path(__file__).with_name("engine.py")
)
_engine = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(_engine)


def get_config() -> ConfigDict:
    c = ConfigDict()
    c.checkpoint = ""  # a Read-ME run or model directory ("" = load_served's default)
    c.num_requests = 48
    c.prompt_len = "16,32"  # lo,hi prompt tokens (uniform), from held-out documents
    c.output_len = "8,16"  # median,max new tokens (lognormal, sigma 0.6, at least 4)
    c.rounds = 2  # alternating rounds per engine (0: no engine runs)
    c.batching = "expert,decode"  # policies for Read-ME (the dense model runs decode)
    c.components = False  # also time the FFN alone
    c.out = ""  # write the JSON summary here
    # the engine block (configs/engine.py); every expert resident, batching per run
    c.engine = _engine.get_engine()
    c.engine.max_len = 256
    return c
