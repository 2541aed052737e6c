"""Build/load HF causal LMs (Llama, Qwen2, Mistral ...); never imports torch.distributed."""
from tidal.models.build import build_model, count_params, hf_config, shape_of

__all__ = ["build_model", "count_params", "hf_config", "shape_of"]
