"""Where the norms sit around a row-parallel reduce (``ModelConfig.residual_layout``):
the one name that the model config and the fused all-reduce + add + RMSNorm
(comm/norm.py) share. No torch here: model configs import it, and the tools' ``--help``
must not pull torch in."""
from __future__ import annotations

from enum import Enum


class Layout(str, Enum):
    """Where the norms sit around a reduce (ModelConfig.residual_layout)."""

    PRE_NORM = "pre-norm"
    SANDWICH = "sandwich"
