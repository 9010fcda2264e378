"""The model layer: encoders (tokenizer + transformer), mask generators, targets and objectives, each in its
own file, combined by `build_model(cfg.model)`. Registries are plain dicts: a new objective, target or
tokenizer is one entry here.

    encoder   vit.py                       what is pretrained, probed, fine-tuned and exported
    masking   masking.py                   which tokens are hidden (random, block, units; the ratio schedule)
    target    targets.py                   what is predicted per patch, and its loss
    objective mae.py, simmim.py, vit_mpp.py how the encoder sees the masked image, and the head that predicts
    parts     fusion.py, batch_losses.py, views.py   block fusion, batch terms, the contrastive view
"""
from __future__ import annotations

from mpp.config import IMAGENET_MEAN, IMAGENET_STD, ConfigError

from .mae import MAE
from .masking import MASK_KINDS, Mask, make_mask, num_masked, ratio_at
from .model import MaskedImageModel, ModelOutput
from .simmim import SimMIM
from .targets import TARGETS, build_target
from .vit import VIT_SIZES, ViTEncoder, set_fused_attn, vit_encoder
from .vit_mpp import ViTMPP

OBJECTIVES = {"mae": MAE, "simmim": SimMIM, "vit_mpp": ViTMPP}
# Tokenizers whose tokens each see only their own patch's pixels: the objectives that corrupt tokens after
# the embedding without hiding pixels (vit_mpp's random and unchanged ones) need such a tokenizer.
TOKENIZERS = {"patch": {"independent_tokens": True}}


def build_encoder(model_cfg, **timm_kwargs) -> ViTEncoder:
    """The encoder of `model_cfg` (model.tokenizer, encoder size, image and patch size, channels, position
    embedding); timm_kwargs (num_classes, global_pool, drop_path_rate ...) pass through to timm."""
    m = model_cfg
    return vit_encoder(m.encoder, m.img_size, m.patch_size, m.in_chans, pos_embed=m.pos_embed, **timm_kwargs)


def build_model(model_cfg, mean=IMAGENET_MEAN, std=IMAGENET_STD) -> MaskedImageModel:
    """The pretraining model of `model_cfg` (config.ModelConfig); mean/std: the data's normalisation (targets
    that need pixels in [0, 1] undo it)."""
    check_model_config(model_cfg)
    encoder = build_encoder(model_cfg)
    target = build_target(model_cfg.target, encoder.patch_size, model_cfg.in_chans, mean, std)
    return OBJECTIVES[model_cfg.objective](encoder, target, model_cfg)


def check_model_config(m, prefix: str = "model.") -> None:
    """Refuse a model section that cannot be built, naming the keys involved and what would fix it."""
    def fail(message: str):
        raise ConfigError(message.replace("{p}", prefix))

    if m.objective not in OBJECTIVES:
        fail(f"unknown {{p}}objective {m.objective!r}; choose one of {', '.join(OBJECTIVES)}")
    if m.tokenizer not in TOKENIZERS:
        fail(f"unknown {{p}}tokenizer {m.tokenizer!r}; choose one of {', '.join(TOKENIZERS)}")
    if m.encoder not in VIT_SIZES:
        fail(f"unknown {{p}}encoder {m.encoder!r}; choose one of {', '.join(VIT_SIZES)}")
    if m.patch_size < 1 or m.img_size % m.patch_size:
        fail(f"{{p}}img_size={m.img_size} is not a multiple of {{p}}patch_size={m.patch_size}")
    grid = m.img_size // m.patch_size
    mask = m.mask
    if mask.kind not in MASK_KINDS:
        fail(f"unknown {{p}}mask.kind {mask.kind!r}; choose one of {', '.join(MASK_KINDS)}")
    if mask.unit < 1 or grid % mask.unit:
        fail(f"{{p}}mask.unit={mask.unit} does not divide the {grid}x{grid} token grid of {{p}}img_size={m.img_size} "
             f"/ {{p}}patch_size={m.patch_size}; choose a divisor of {grid}")
    units = (grid // mask.unit) ** 2
    for key, ratio in (("ratio", mask.ratio), ("ratio_end", mask.ratio_end)):
        if ratio is not None and not 0 < ratio < 1:
            fail(f"{{p}}mask.{key}={ratio} must be in (0, 1)")
        if ratio is not None and num_masked(units, ratio) in (0, units):
            fail(f"{{p}}mask.{key}={ratio} masks {num_masked(units, ratio)} of the {units} mask units "
                 f"({{p}}mask.unit={mask.unit}): none would be {'masked' if num_masked(units, ratio) == 0 else 'visible'}")
    if mask.schedule not in ("constant", "linear", "cosine"):
        fail(f"unknown {{p}}mask.schedule {mask.schedule!r}; choose constant, linear or cosine")
    target = m.target
    if target.kind not in TARGETS:
        fail(f"unknown {{p}}target.kind {target.kind!r}; choose one of {', '.join(TARGETS)}")
    if target.kind == "hog":
        cell = target.hog_cell or max(1, m.patch_size // 2)
        if m.patch_size % cell:
            fail(f"{{p}}target.hog_cell={cell} does not divide {{p}}patch_size={m.patch_size}: a patch's HOG "
                 f"target is whole cells")
    if target.kind == "mean_color" and not 1 <= target.bits <= 4:
        fail(f"{{p}}target.bits={target.bits}: choose 1 to 4 bits per channel")
    if m.objective == "mae" and m.decoder.dim % m.decoder.heads:
        fail(f"{{p}}decoder.heads={m.decoder.heads} does not divide {{p}}decoder.dim={m.decoder.dim}")
    if m.objective == "vit_mpp":
        c = m.corruption
        if min(c.mask_token, c.random_patch) < 0 or c.mask_token + c.random_patch > 1:
            fail(f"{{p}}corruption.mask_token={c.mask_token} and {{p}}corruption.random_patch={c.random_patch} must "
                 f"be fractions summing to at most 1 (the rest are left unchanged)")
        if not TOKENIZERS[m.tokenizer]["independent_tokens"]:
            fail(f"{{p}}objective=vit_mpp needs tokens that each see only their own patch, which "
                 f"{{p}}tokenizer={m.tokenizer} does not give: use {{p}}objective=simmim or mae")
    depth = VIT_SIZES[m.encoder][1]
    if any(not 0 <= i < depth - 1 for i in m.fuse_blocks):
        fail(f"{{p}}fuse_blocks={list(m.fuse_blocks)}: give blocks 0 to {depth - 2} of the {depth}-block "
             f"{{p}}encoder={m.encoder} (the last one is always fused)")
    if m.uniformity < 0 or m.contrastive < 0 or m.contrastive_temperature <= 0:
        fail(f"{{p}}uniformity and {{p}}contrastive must be >= 0 and {{p}}contrastive_temperature > 0")


__all__ = ["MAE", "MASK_KINDS", "Mask", "MaskedImageModel", "ModelOutput", "OBJECTIVES", "SimMIM", "TARGETS",
           "TOKENIZERS", "VIT_SIZES", "ViTEncoder", "ViTMPP", "build_encoder", "build_model", "check_model_config",
           "make_mask", "ratio_at", "set_fused_attn", "vit_encoder"]
