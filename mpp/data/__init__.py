from .pretrain import normalizer, pretrain_loader, preview_images
from .shards import ShardList, resolve_shards

__all__ = ["ShardList", "normalizer", "pretrain_loader", "preview_images", "resolve_shards"]
