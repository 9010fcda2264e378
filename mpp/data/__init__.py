"""Shard specs, decoding and the streaming loader (see mpp/data/loader.py for the plan)."""
from .decode import CropTransform, build_transform, decode_rgb, to_rgb
from .loader import EpochPlan, ShardLoader
from .pretrain import normalizer, preview_images
from .shards import ShardList, read_slice, resolve_shards

__all__ = ["CropTransform", "EpochPlan", "ShardList", "ShardLoader", "build_transform", "decode_rgb", "normalizer",
           "preview_images", "read_slice", "resolve_shards", "to_rgb"]
