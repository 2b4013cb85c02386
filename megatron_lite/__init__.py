"""megatron_lite: a slim Megatron-style tensor-parallel inference engine with a low-bit
quantized all-reduce.

``Engine`` and ``CommSpec`` are imported lazily, so that ``import megatron_lite`` (e.g. by
the converter) does not pull in the inference stack or the comm layer.
"""
from megatron_lite.models.config import ModelConfig

__all__ = ["Engine", "ModelConfig", "CommSpec", "parse_comm"]


def __getattr__(name):
    if name == "Engine":
        from megatron_lite.inference.engine import Engine
        return Engine
    if name in ("CommSpec", "parse_comm"):
        from megatron_lite.comm import spec
        return getattr(spec, name)
    raise AttributeError(f"module 'megatron_lite' has no attribute {name!r}")
