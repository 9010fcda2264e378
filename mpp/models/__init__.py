"""The model layer: encoders (tokenizer + transformer), mask generators, targets and objectives, each in its
own file, combined by `build_model(cfg.model)`. Registries are plain dicts: a new objective, target or
tokenizer is one entry here.

    encoder   vit.py (patch tokens), hybrid.py (a ResNet's map), t2t.py (Tokens-to-Token), vt.py (VT-ResNet);
              sparse.py: the mask-aware CNN layers of hybrid and vt. What is pretrained, probed, fine-tuned, exported
    masking   masking.py                   which tokens are hidden (random, block, units; the ratio schedule)
    target    targets.py                   what is predicted per patch, and its loss
    objective mae.py, simmim.py, vit_mpp.py how the encoder sees the masked image, and the head that predicts
    parts     fusion.py, batch_losses.py, views.py   block fusion, batch terms, the contrastive view
"""
from __future__ import annotations

from mpp.config import IMAGENET_MEAN, IMAGENET_STD
from mpp.recipe import ConfigError

from .mae import MAE
from .masking import MASK_KINDS, Mask, make_mask, num_masked, ratio_at
from .model import MaskedImageModel, ModelOutput
from .simmim import SimMIM
from .targets import TARGETS, build_target
from .hybrid import hybrid_encoder, total_stride as hybrid_stride
from .t2t import T2T_SIZES, split_sizes, splits_stride, t2t_encoder
from .vit import VIT_SIZES, ViTEncoder, set_fused_attn, vit_encoder
from .vit_mpp import ViTMPP
from .vt import VT_SIZES, VT_STEMS, VTEncoder

OBJECTIVES = {"mae": MAE, "simmim": SimMIM, "vit_mpp": ViTMPP}


def _build_patch(m, **kw):
    return vit_encoder(m.encoder, m.img_size, m.patch_size, m.in_chans, pos_embed=m.pos_embed, **kw)


def _build_hybrid(m, **kw):
    return hybrid_encoder(m.encoder, m.img_size, m.patch_size, m.in_chans, pos_embed=m.pos_embed,
                          layers=m.hybrid.layers, stem=m.hybrid.stem, **kw)


def _build_t2t(m, **kw):
    return t2t_encoder(m.encoder, m.img_size, m.in_chans, pos_embed=m.pos_embed, splits=m.t2t.splits,
                       token_dim=m.t2t.token_dim, **kw)


def _build_vt(m, **kw):
    return VTEncoder(m.encoder, m.img_size, m.in_chans, tokens=m.vt.tokens, stem=m.vt.stem, pos_embed=m.pos_embed,
                     **kw)


# Per tokenizer: build(model_cfg, **timm_kwargs); its encoder sizes (model.encoder: name -> (width, depth, ...));
# stride(model_cfg): its total stride, which model.patch_size must equal (None: patch_size is free), and the keys
# that set it; vit: the encoder is a ViTEncoder (tokens MAE can drop, blocks fuse_blocks can fuse);
# independent_tokens: every token sees its own patch's pixels only (the objectives that corrupt tokens after
# the embedding without hiding pixels, vit_mpp's random and unchanged ones, need it).
TOKENIZERS = {
    "patch": dict(build=_build_patch, sizes=VIT_SIZES, stride=None, vit=True, independent_tokens=True),
    "hybrid": dict(build=_build_hybrid, sizes=VIT_SIZES, vit=True, independent_tokens=False,
                   stride=(lambda m: hybrid_stride(m.hybrid.layers, m.hybrid.stem), "hybrid.layers and {p}hybrid.stem")),
    "t2t": dict(build=_build_t2t, sizes=T2T_SIZES, vit=True, independent_tokens=False,
                stride=(lambda m: splits_stride(m.t2t.splits), "t2t.splits' strides")),
    "vt": dict(build=_build_vt, sizes=VT_SIZES, vit=False, independent_tokens=False,
               stride=(lambda m: VT_STEMS[m.vt.stem] * 4, "vt.stem and the ResNet's stages 1-3")),
}


def build_encoder(model_cfg, **timm_kwargs) -> ViTEncoder | VTEncoder:
    """The encoder of `model_cfg` (model.tokenizer and its section, encoder size, image and patch size, channels,
    position embedding); timm_kwargs (num_classes, global_pool, drop_path_rate ...) pass through to timm."""
    return TOKENIZERS[model_cfg.tokenizer]["build"](model_cfg, **timm_kwargs)


def load_encoder(path, **timm_kwargs) -> ViTEncoder | VTEncoder:
    """The encoder of a file `python -m mpp.export` wrote (or any checkpoint), rebuilt from the model config
    stored with its weights, without a recipe; eval mode. A classifier head in the file is rebuilt and loaded."""
    from mpp.weights import read_weights
    raw, config = read_weights(path)
    return rebuild_encoder(raw, config, str(path), **timm_kwargs)[0].eval()


def rebuild_encoder(state: dict, config: dict | None, source: str, **timm_kwargs):
    """(the encoder, its ModelConfig) that the run config `config` describes, holding `state` (any stage's keys);
    its classifier head, if `state` has one, too. ValueError if there is no model config or the weights do not fit."""
    from mpp.config import ModelConfig
    from mpp.recipe import from_dict
    from mpp.weights import load_weights, vit_state
    model = (config or {}).get("model")
    if not isinstance(model, dict):
        raise ValueError(f"{source} stores no model config: build the encoder with mpp.models.build_encoder(model "
                         f"config) and load it with mpp.weights.load_weights")
    cfg = from_dict(ModelConfig, model, "model.")
    state = vit_state(state)
    if "head.weight" in state:
        timm_kwargs.setdefault("num_classes", state["head.weight"].shape[0])
    if "fc_norm.weight" in state and "norm.weight" not in state:
        timm_kwargs.setdefault("global_pool", "avg")  # a ViT fine-tuned on the mean patch token
    encoder = build_encoder(cfg, **timm_kwargs)
    load_weights(encoder, state, head=True)
    return encoder, cfg


def frozen_encoder(model_cfg, ckpt) -> tuple[ViTEncoder | VTEncoder, list[str]]:
    """(the encoder of `model_cfg` holding `ckpt`'s weights, frozen and in eval mode, what loading them noted), for
    evaluation. ckpt None or "none": randomly initialised (seed it first) as pretraining initialises it
    (model.objective's init, e.g. MAE's xavier), the baseline: pretraining's starting point in distribution, not
    the same draw (pretraining builds its decoder before it initialises, which moves the generator)."""
    from mpp.weights import is_random_init, load_weights
    if ckpt is None or is_random_init(ckpt):
        encoder = build_model(model_cfg).encoder
        notes = [f"randomly initialised {model_cfg.encoder} encoder (ckpt=none, {model_cfg.objective}'s "
                 f"initialisation): the baseline"]
    else:
        encoder = build_encoder(model_cfg)
        notes = load_weights(encoder, str(ckpt))
    encoder.requires_grad_(False)
    return encoder.eval(), notes


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
    tokenizer = TOKENIZERS[m.tokenizer]
    if m.encoder not in tokenizer["sizes"]:
        fail(f"unknown {{p}}encoder {m.encoder!r} for {{p}}tokenizer={m.tokenizer}; choose one of "
             f"{', '.join(tokenizer['sizes'])}")
    check_tokenizer_section(m, fail)
    if tokenizer["stride"] is not None:
        stride_of, keys = tokenizer["stride"]
        stride = stride_of(m)
        if m.patch_size != stride:
            fail(f"{{p}}patch_size={m.patch_size} is not the total stride of {{p}}tokenizer={m.tokenizer}, {stride} px "
                 f"(set by {{p}}{keys}): set {{p}}patch_size={stride}")
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
    if m.objective == "mae" and not tokenizer["vit"]:
        fail(f"{{p}}objective=mae drops the hidden tokens of a ViT; {{p}}tokenizer={m.tokenizer}'s encoder has none "
             f"(its output is a map): use {{p}}objective=simmim")
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
    if m.fuse_blocks and not tokenizer["vit"]:
        fail(f"{{p}}fuse_blocks={list(m.fuse_blocks)}: {{p}}tokenizer={m.tokenizer}'s encoder has no transformer "
             f"blocks to fuse; set {{p}}fuse_blocks=[]")
    depth = tokenizer["sizes"][m.encoder][1] if tokenizer["vit"] else 0
    if any(not 0 <= i < depth - 1 for i in m.fuse_blocks):
        fail(f"{{p}}fuse_blocks={list(m.fuse_blocks)}: give blocks 0 to {depth - 2} of the {depth}-block "
             f"{{p}}encoder={m.encoder} (the last one is always fused)")
    if m.uniformity < 0 or m.contrastive < 0 or m.contrastive_temperature <= 0:
        fail("{p}uniformity and {p}contrastive must be >= 0 and {p}contrastive_temperature > 0")


def check_tokenizer_section(m, fail) -> None:
    """The chosen tokenizer's own section (model.hybrid, model.t2t, model.vt); the others are not read."""
    if m.tokenizer == "hybrid":
        layers = m.hybrid.layers
        if not 1 <= len(layers) <= 4 or min(layers) < 1:
            fail(f"{{p}}hybrid.layers={list(layers)}: give 1 to 4 stages of at least one block (R50 s16: [3, 4, 9])")
    elif m.tokenizer == "t2t":
        splits = m.t2t.splits
        if not splits or any(len(s) != 3 or s[0] < s[1] or min(s[:2]) < 1 or s[2] < 0 for s in splits):
            fail(f"{{p}}t2t.splits={splits}: give soft splits as [kernel, stride, padding], kernel >= stride >= 1 "
                 f"(the paper: [[7, 4, 2], [3, 2, 1], [3, 2, 1]])")
        stride = splits_stride(splits)
        side = split_sizes(m.img_size, splits)[-1]
        if side * stride != m.img_size:
            fail(f"{{p}}t2t.splits={splits} on {{p}}img_size={m.img_size} give a {side}x{side} grid, not "
                 f"{{p}}img_size / their total stride {stride}: change the paddings or the image size")
        if m.t2t.token_dim < 1:
            fail(f"{{p}}t2t.token_dim={m.t2t.token_dim} must be at least 1")
    elif m.tokenizer == "vt" and m.vt.tokens < 1:
        fail(f"{{p}}vt.tokens={m.vt.tokens} must be at least 1 (the paper: 16)")


__all__ = ["MAE", "MASK_KINDS", "Mask", "MaskedImageModel", "ModelOutput", "OBJECTIVES", "SimMIM",
           "T2T_SIZES", "TARGETS", "TOKENIZERS", "VIT_SIZES", "VT_SIZES", "VTEncoder", "ViTEncoder", "ViTMPP",
           "build_encoder", "build_model", "check_model_config", "frozen_encoder", "hybrid_encoder", "load_encoder",
           "make_mask", "rebuild_encoder",
           "ratio_at", "set_fused_attn", "t2t_encoder", "vit_encoder"]
