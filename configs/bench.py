"""Speed benchmark config (`launch/bench.py`, `make bench`).

python launch/bench.py --config.moe_checkpoint=runs/smollm2_135m/moe_trained --config.peer=False
"""

from ml_collections import ConfigDict


def get_config() -> ConfigDict:
    c = ConfigDict()
    c.out = (
        "docs/benchmarks.md"  # the section between the bench markers; results next to it (.json)
    )
    c.moe_checkpoint = ""  # a Read-ME model; "" = a quick refactoring (4 x 256 tokens/domain)
    c.peer = True  # Hugging Face transformers / PyTorch on the same weights (if installed)
    # the peer's Python (a torch venv; make peer builds it) and the script it runs
    c.peer_python = ".venv-peer/bin/python"
    c.peer_script = "tools/peer_bench.py"
    c.moe = True  # the Read-ME sections (MoE vs dense, decode ablation, engine vs Generator)
    c.rounds = 2  # alternating rounds of ours and the peer (best of each)
    return c
