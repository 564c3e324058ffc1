"""poetx: memory-efficient LLM pretraining by POET-X (``W = R · W0 · P``, only rotations train).

The public names load on first use (PEP 562), so ``import poetx.cli.main`` and ``poetx --help``
do not pay for importing torch and transformers.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from poetx.config import POETConfig
    from poetx.layers.poet_linear import POETLinear
    from poetx.model.wrap import unwrap, wrap
    from poetx.optim.merge import MergeSchedule
    from poetx.optim.optimizer import make_optimizer
    from poetx.optim.poet_adamw import POETAdamW

_EXPORTS = {
    "POETConfig": "poetx.config",
    "POETLinear": "poetx.layers.poet_linear",
    "wrap": "poetx.model.wrap",
    "unwrap": "poetx.model.wrap",
    "make_optimizer": "poetx.optim.optimizer",
    "MergeSchedule": "poetx.optim.merge",
    "POETAdamW": "poetx.optim.poet_adamw",
}

__all__ = ["POETConfig", "POETLinear", "wrap", "unwrap", "make_optimizer", "MergeSchedule",
           "POETAdamW"]
__version__ = "0.1.0"


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        value = getattr(importlib.import_module(_EXPORTS[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'poetx' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
