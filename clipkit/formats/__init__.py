"""Model formats: the clipkit directory, Hugging Face CLIP directories and OpenCLIP/OpenAI weight files.

One module per format turns a path into `(ModelConfig, state dict, tokenizer)`; `load` (in `auto`)
picks the format and builds the model. Nothing is ever unpickled beyond tensors (`weights`).
"""
from .auto import build, detect_format, load, read_any
from .hf import save_hf
from .native import save
from .weights import load_state, read_safetensors, safe_torch_load

__all__ = ["build", "detect_format", "load", "load_state", "read_any", "read_safetensors", "safe_torch_load",
           "save", "save_hf"]
