"""Flow-matching training of SANA models on a data x fsdp device mesh."""

from sana_jax.trainer.config import default_config, validate
from sana_jax.trainer.loop import Stopped, WorkdirError, run, train

__all__ = ["Stopped", "WorkdirError", "default_config", "run", "train", "validate"]
