"""ExpertSpec: which dense FFN channels each expert owns, per layer (Read-ME section 1.1).

Built by `refactor/experts.py:build_expert_spec` from activation statistics; saved in the
`experts/` folder of every MoE checkpoint (`checkpoints/models.py`) and read by the loaders,
evaluation (active parameters) and training (channel masks). It lives in `model/` because every
consumer needs it and `checkpoints/` may import only `model/`.

Shapes: E experts, L layers, F dense FFN width, Fs / Fe the padded shared / expert widths.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

import numpy as np


@dataclasses.dataclass
class ExpertSpec:
    """Which dense FFN channels each expert owns, per layer. Saved with every MoE checkpoint."""

    domains: list[str]
    remain_rate: float
    domain_masks_ExLxF: np.ndarray  # bool
    shared_idx_LxFs: np.ndarray  # int32, -1 = padding
    expert_idx_LxExFe: np.ndarray  # int32, -1 = padding

    @property
    def num_experts(self) -> int:
        return len(self.domains)

    @property
    def shared_widths(self) -> np.ndarray:
        return (self.shared_idx_LxFs >= 0).sum(-1)

    @property
    def expert_widths(self) -> np.ndarray:  # [L, E]
        return (self.expert_idx_LxExFe >= 0).sum(-1)

    def to_json(self) -> dict[str, Any]:
        return {
            "domains": self.domains,
            "remain_rate": self.remain_rate,
            "shared_widths": self.shared_widths.tolist(),
            "expert_widths": self.expert_widths.tolist(),
        }

    def save(self, path: str | Path) -> None:
        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        np.savez_compressed(
            path / "experts.npz",
            domain_masks=self.domain_masks_ExLxF,
            shared_idx=self.shared_idx_LxFs,
            expert_idx=self.expert_idx_LxExFe,
        )
        (path / "experts.json").write_text(json.dumps(self.to_json(), indent=2))

    @classmethod
    def load(cls, path: str | Path) -> ExpertSpec:
        path = Path(path)
        meta = json.loads((path / "experts.json").read_text())
        z = np.load(path / "experts.npz")
        return cls(
            meta["domains"],
            meta["remain_rate"],
            z["domain_masks"],
            z["shared_idx"],
            z["expert_idx"],
        )
