"""Inference: static KV cache, rank-identical sampling, and the Engine."""
from megatron_lite.inference.engine import Engine, GenerationResult

__all__ = ["Engine", "GenerationResult"]
