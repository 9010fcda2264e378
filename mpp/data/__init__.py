from .pretrain import normalizer, pretrain_loader
from .shards import ShardList, resolve_shards

__all__ = ["ShardList", "normalizer", "pretrain_loader", "resolve_shards"]
