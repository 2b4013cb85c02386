"""Model configs (one ModelConfig for every supported HF model_type) and the one decoder."""
from megatron_lite.models.config import (SUPPORTED_MODEL_TYPES, ModelConfig, TPSizeError,
                                         UnsupportedModelError)

__all__ = ["ModelConfig", "SUPPORTED_MODEL_TYPES", "TPSizeError", "UnsupportedModelError"]
