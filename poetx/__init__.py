"""poetx: memory-efficient LLM pretraining by POET-X (``W = R · W0 · P``, only rotations train)."""

from poetx.config import POETConfig
from poetx.layers.poet_linear import POETLinear
from poetx.model.wrap import unwrap, wrap
from poetx.optim.merge import MergeSchedule
from poetx.optim.optimizer import make_optimizer
from poetx.optim.poet_adamw import POETAdamW

__all__ = ["POETConfig", "POETLinear", "wrap", "unwrap", "make_optimizer", "MergeSchedule",
           "POETAdamW"]
__version__ = "0.1.0"
