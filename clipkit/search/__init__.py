"""Search: the FAISS index with exact rerank, MMR and filters, its on-disk format, and collections
(resumable, shardable embedding of an image folder or table, and indexes built from it)."""
from .build import choose_factory
from .collection import build_index_from_collection, embed_collection, load_collection, open_search
from .exact import exact_search, recall_at_k
from .index import SearchIndex

__all__ = ["SearchIndex", "build_index_from_collection", "choose_factory", "embed_collection", "exact_search",
           "load_collection", "open_search", "recall_at_k"]
