"""The model: configs and presets, timm/transformers towers, tokenizers, image preprocessing, CLIPModel."""
from .clip import CLIPModel, ClipOutput
from .config import ModelConfig, PreprocessConfig, TextConfig, VisionConfig, get_preset, list_presets
from .factory import bind_tokenizer, create_model, create_model_and_tokenizer, get_tokenizer, resolve_config
from .tokenizer import TokenIds, Tokenizer
from .transforms import Preprocess, load_image

__all__ = ["CLIPModel", "ClipOutput", "ModelConfig", "Preprocess", "PreprocessConfig", "TextConfig", "TokenIds",
           "Tokenizer", "VisionConfig", "bind_tokenizer", "create_model", "create_model_and_tokenizer", "get_preset",
           "get_tokenizer", "list_presets", "load_image", "resolve_config"]
