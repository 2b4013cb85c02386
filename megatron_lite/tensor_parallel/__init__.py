"""Megatron-style tensor-parallel layers and TP-region functions (inference only)."""
from megatron_lite.tensor_parallel.layers import (ColumnParallelLinear, ParallelLMHead,
                                                  RowParallelLinear, VocabParallelEmbedding)
from megatron_lite.tensor_parallel.mappings import (
    copy_to_tensor_model_parallel_region, gather_from_tensor_model_parallel_region,
    reduce_add_rmsnorm_from_tensor_model_parallel_region,
    reduce_from_tensor_model_parallel_region, scatter_to_tensor_model_parallel_region)

__all__ = ["ColumnParallelLinear", "RowParallelLinear", "VocabParallelEmbedding",
           "ParallelLMHead", "copy_to_tensor_model_parallel_region",
           "reduce_from_tensor_model_parallel_region",
           "reduce_add_rmsnorm_from_tensor_model_parallel_region",
           "gather_from_tensor_model_parallel_region",
           "scatter_to_tensor_model_parallel_region"]
