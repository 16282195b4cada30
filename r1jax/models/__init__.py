"""Model family: DeepSeek-V3/R1, DeepSeek-V2(-Lite), Qwen2/2.5, Llama 3 (see transformer.py)."""

from r1jax.models.transformer import Transformer, abstract_model, forward, init_model

__all__ = ["Transformer", "abstract_model", "forward", "init_model"]
