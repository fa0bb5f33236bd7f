"""clipkit: train, evaluate and use CLIP-style image-text embeddings."""
from .checkpoint import load, save, save_hf
from .config import ModelConfig, PreprocessConfig, TextConfig, VisionConfig, get_preset, list_presets
from .embed import Embedder
from .factory import create_model, create_model_and_tokenizer, get_tokenizer
from .model import CLIPModel, ClipOutput
from .tokenizer import Tokenizer
from .transforms import Preprocess, load_image

__version__ = "0.1.0"
__all__ = [
    "CLIPModel", "ClipOutput", "Embedder", "ModelConfig", "Preprocess", "PreprocessConfig", "TextConfig",
    "Tokenizer", "VisionConfig", "create_model", "create_model_and_tokenizer", "get_preset", "get_tokenizer",
    "list_presets", "load", "load_image", "save", "save_hf",
]
