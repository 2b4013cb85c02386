"""megatron_lite: a slim Megatron-style tensor-parallel inference engine for Llama and Gemma.

``Engine`` and ``CommConfig`` are imported lazily, so that ``import megatron_lite`` (e.g. by
the converter) does not pull in the inference stack or the comm layer.
"""
from megatron_lite.models.config import ModelConfig

__all__ = ["Engine", "ModelConfig", "CommConfig"]


def __getattr__(name):
    if name == "Engine":
        from megatron_lite.inference.engine import Engine
        return Engine
    if name == "CommConfig":
        from megatron_lite.comm.allreduce import CommConfig
        return CommConfig
    raise AttributeError(f"module 'megatron_lite' has no attribute {name!r}")
