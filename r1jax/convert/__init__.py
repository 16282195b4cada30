"""HF safetensors <-> r1jax parameters (DeepSeek-V3/R1 incl. FP8, DeepSeek-V2, Qwen2/2.5, Llama 3)."""

from r1jax.convert.hf import hf_config_from_model, hf_layout, load_hf, model_config_from_hf, save_hf
from r1jax.convert.safetensors_io import Checkpoint, dequantize_fp8_blocks
from r1jax.errors import CheckpointError

__all__ = ["Checkpoint", "CheckpointError", "dequantize_fp8_blocks", "hf_config_from_model", "hf_layout",
           "load_hf", "model_config_from_hf", "save_hf"]
