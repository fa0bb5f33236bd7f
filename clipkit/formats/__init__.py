"""Model formats: the clipkit directory, Hugging Face CLIP directories, OpenCLIP/OpenAI weight files, and
pretrained weights by name through the Hugging Face hub (`hub`, `pretrained`: open_clip-style entry points).

One module per format turns a path into `(ModelConfig, state dict, tokenizer)`; `load` (in `auto`)
picks the format and builds the model. Nothing is ever unpickled beyond tensors (`weights`).
"""
from .auto import build, detect_format, load, read_any
from .hf import save_hf
from .native import save
from .pretrained import (create_model, create_model_and_tokenizer, create_model_and_transforms, get_tokenizer,
                         list_pretrained)
from .weights import load_state, read_safetensors, safe_torch_load

__all__ = ["build", "create_model", "create_model_and_tokenizer", "create_model_and_transforms", "detect_format",
           "get_tokenizer", "list_pretrained", "load", "load_state", "read_any", "read_safetensors", "safe_torch_load",
           "save", "save_hf"]
