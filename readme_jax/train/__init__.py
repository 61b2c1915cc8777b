"""Router and expert distillation training (Read-ME section 1.3): losses, phases, checkpoints,
the mesh, and the paper-scale dry run."""

from readme_jax.train.config import TrainConfig, TrainConfigError, resolve
from readme_jax.train.context import TrainingError
from readme_jax.train.loop import run_training

__all__ = ["TrainConfig", "TrainConfigError", "TrainingError", "resolve", "run_training"]
