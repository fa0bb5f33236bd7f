"""Image-caption data: tables and folders, tar shards, dataset items with skip counts, the decoded-image cache,
and the built-in demo datasets."""
from .cache import CachedPairDataset, DecodedCache
from .samples import PairDataset, SkipCounter, collate, make_loader
from .shards import TarShardDataset, expand_shards, pair_dataset
from .tables import IMAGE_EXTS, read_folder, read_pairs, read_table

__all__ = ["IMAGE_EXTS", "CachedPairDataset", "DecodedCache", "PairDataset", "SkipCounter", "TarShardDataset",
           "collate", "expand_shards", "make_loader", "pair_dataset", "read_folder", "read_pairs", "read_table"]
