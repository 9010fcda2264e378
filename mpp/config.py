"""The stages' config schemas: one dataclass per recipe section, each field's comment its documentation.

Recipes are read and checked against them by mpp/recipe.py (the `_base_` chain, overrides, errors).
"""
from __future__ import annotations

import dataclasses
from typing import Literal, Union

from mpp.recipe import ConfigError, LIMITS

LIMITS.update({
    "train.steps": (1, "optimizer steps; null: train.epochs decides"),
    "train.batch_size": (1, "images per optimizer step"),
    "train.micro_batch_size": (1, "images per forward pass"),
    "train.warmup_steps": (0, "steps of linear warm-up"),
    "train.warmup_epochs": (0, "epochs of linear warm-up"),
    "train.max_bad_steps": (1, "non-finite steps in a row that stop the run"),
    "train.cpu_threads": (1, "threads; null: this process's share of the cores"),
    "data.num_workers": (0, "loader processes; 0 loads in the training process"),
    "data.shuffle_buffer": (0, "samples in the shuffle buffer"),
    "data.batch_size": (1, "images per batch"),
    "data.num_samples": (1, "samples in the shards"),
    "log.every": (1, "steps between metric records"),
    "log.image_every": (0, "steps between reconstruction grids; 0: only at the end"),
    "checkpoint.every": (1, "steps between checkpoints"),
    "checkpoint.keep": (0, "checkpoints kept; 0: all"),
    "knn.every": (0, "steps between kNN evaluations; 0: off"),
    "probe.batch_size": (1, "the probe's largest batch"),
    "probe.epochs": (1, "epochs of the probe"),
    "probe.min_steps": (1, "the probe's fewest head updates"),
    "probe.min_epoch_steps": (1, "the probe's fewest head updates an epoch"),
})


# ---- Schemas. Each field's comment is its documentation; recipes/base.yaml sets them all. ----
IMAGENET_MEAN = [0.485, 0.456, 0.406]
IMAGENET_STD = [0.229, 0.224, 0.225]


@dataclasses.dataclass
class MaskConfig:
    """model.mask: which tokens are hidden (mpp/models/masking.py)."""
    kind: str = "random"            # random (MAE) | block (BEiT's rectangles)
    ratio: float = 0.75             # fraction of mask units hidden (vit_mpp: corrupted), exact per image
    unit: int = 1                   # mask square groups of unit x unit tokens (SimMIM: 2 = 32 px on patch 16)
    min_block: int = 16             # block: the smallest rectangle drawn, in units (BEiT: 16)
    schedule: str = "constant"      # the ratio over the run: constant | linear | cosine, from ratio to ratio_end
    ratio_end: Union[float, None] = None  # the ratio at the last step (linear, cosine)


@dataclasses.dataclass
class TargetConfig:
    """model.target: what is predicted for each scored patch (mpp/models/targets.py); each key is read only by
    the kind it names."""
    kind: str = "pixels"            # pixels | mean_color (the ViT paper's) | hog (MaskFeat's)
    norm_pix: bool = True           # pixels: per-patch normalised pixels (MAE)
    loss: Literal["l2", "l1"] = "l2"  # pixels: l2 (MAE) | l1 (SimMIM)
    bits: int = 3                   # mean_color: levels per channel = 2^bits (3: 512 classes)
    hog_cell: Union[int, None] = None  # hog: cell size in pixels; null: half the patch (MaskFeat: 8 on patch 16)
    hog_bins: int = 9               # hog: unsigned orientation bins


@dataclasses.dataclass
class DecoderConfig:
    """model.decoder: MAE's transformer decoder (objective mae only)."""
    dim: int = 512
    depth: int = 8
    heads: int = 16


@dataclasses.dataclass
class CorruptionConfig:
    """model.corruption: what becomes of the corrupted tokens (objective vit_mpp only); the rest stay unchanged."""
    mask_token: float = 0.8         # replaced by the learned [mask] embedding
    random_patch: float = 0.1       # replaced by the embedding of another (uncorrupted) patch of the image


@dataclasses.dataclass
class HybridConfig:
    """model.hybrid: tokenizer hybrid's CNN, timm's ResNetV2 as its hybrid ViTs have it (mpp/models/hybrid.py)."""
    layers: list[int] = dataclasses.field(default_factory=lambda: [3, 4, 9])  # bottlenecks per stage (R50 s16)
    stem: Literal["timm", "small"] = "timm"  # timm: 7x7/2 conv + 3x3/2 max pool; small: one 3x3/1 conv (32 px)


@dataclasses.dataclass
class T2TConfig:
    """model.t2t: tokenizer t2t's Tokens-to-Token module (mpp/models/t2t.py)."""
    # soft splits as [kernel, stride, padding]; the strides' product is the patch size
    splits: list[list[int]] = dataclasses.field(default_factory=lambda: [[7, 4, 2], [3, 2, 1], [3, 2, 1]])
    token_dim: int = 64             # token width inside the module


@dataclasses.dataclass
class VTConfig:
    """model.vt: tokenizer vt's VT modules on a ResNet's stage-3 map (mpp/models/vt.py)."""
    tokens: int = 16                # visual tokens L
    stem: Literal["timm", "small"] = "timm"  # timm: ResNet's 7x7/2 conv + max pool; small: CIFAR's 3x3/1 conv


@dataclasses.dataclass
class ModelConfig:
    objective: str = "mae"          # mae | simmim | vit_mpp (mpp.models.OBJECTIVES)
    tokenizer: str = "patch"        # how pixels become tokens: patch | hybrid | t2t | vt (mpp.models.TOKENIZERS)
    encoder: str = "base"           # size: tiny ... huge (patch, hybrid) | t2t_7, t2t_14 ... | vt_r18, vt_r34
    img_size: int = 224
    patch_size: int = 16            # pixels per token side (hybrid, t2t, vt: their total stride)
    in_chans: int = 3
    pos_embed: Literal["sincos", "learned"] = "sincos"  # fixed 2-D sin-cos (MAE) or learned (the ViT paper)
    mask: MaskConfig = dataclasses.field(default_factory=MaskConfig)
    target: TargetConfig = dataclasses.field(default_factory=TargetConfig)
    decoder: DecoderConfig = dataclasses.field(default_factory=DecoderConfig)
    corruption: CorruptionConfig = dataclasses.field(default_factory=CorruptionConfig)
    hybrid: HybridConfig = dataclasses.field(default_factory=HybridConfig)
    t2t: T2TConfig = dataclasses.field(default_factory=T2TConfig)
    vt: VTConfig = dataclasses.field(default_factory=VTConfig)
    # Earlier encoder blocks (0-based) fused with the last into the head's input (MFF); []: none.
    fuse_blocks: list[int] = dataclasses.field(default_factory=list)
    uniformity: float = 0.0         # weight of U-MAE's feature-uniformity term over the micro-batch (0: off)
    contrastive: float = 0.0        # weight of a SimCLR term between each image and a second view of it (0: off)
    contrastive_temperature: float = 0.1  # the contrastive term's softmax temperature

    def validate(self, prefix: str) -> None:
        from mpp.models import check_model_config
        check_model_config(self, prefix)


@dataclasses.dataclass
class DataConfig:
    train: Union[str, list[str], None] = None  # shards: data_tools output dir / manifest.json, brace pattern, or list
    split: str = "train"            # split of a manifest to read
    num_samples: Union[int, None] = None  # samples per epoch when the spec has no manifest
    num_workers: int = 8            # loader processes per rank
    shuffle_buffer: int = 5000
    crop_scale: list[float] = dataclasses.field(default_factory=lambda: [0.2, 1.0])
    mean: list[float] = dataclasses.field(default_factory=lambda: list(IMAGENET_MEAN))
    std: list[float] = dataclasses.field(default_factory=lambda: list(IMAGENET_STD))


@dataclasses.dataclass
class TrainConfig:
    batch_size: int = 4096          # effective batch per optimizer step, over all processes
    micro_batch_size: int = 256     # per process and forward pass; accumulation makes up the rest
    epochs: float = 800
    steps: Union[int, None] = None  # if set, overrides epochs
    warmup_epochs: float = 40
    warmup_steps: Union[int, None] = None  # if set, overrides warmup_epochs
    # auto: bf16 on GPUs that have it (else fp16), on CPUs only where bf16 matmuls measure faster (else no: fp32)
    mixed_precision: Literal["auto", "bf16", "fp16", "no"] = "auto"
    grad_clip: Union[float, None] = None
    fused_attn: Union[bool, None] = None  # null: torch's fused kernel; explicit matmuls for bf16 on CPUs with bf16 units
    # torch.compile the model; auto: on GPUs, and on CPUs where a trial on the run's first steps shows a gain
    compile: Union[bool, Literal["auto"]] = "auto"
    cpu_threads: Union[int, None] = None  # on CPU; null: this process's cores / processes on the machine
    max_bad_steps: int = 10         # consecutive non-finite losses that stop the run
    # recompute each transformer block's activations in the backward pass (timm's set_grad_checkpointing): less
    # memory for encoders that do not fit, at the cost of a second forward through the blocks
    grad_checkpointing: bool = False


@dataclasses.dataclass
class OptimConfig:
    base_lr: float = 1.5e-4         # lr = base_lr * batch_size / 256
    min_lr: float = 0.0
    weight_decay: float = 0.05
    betas: list[float] = dataclasses.field(default_factory=lambda: [0.9, 0.95])


@dataclasses.dataclass
class LogConfig:
    every: int = 50                 # steps between metric records
    image_every: int = 1000         # steps between reconstruction grids (one is also written at the end)
    # accelerate's trackers the metrics also go to (tensorboard: output_dir/tensorboard; wandb, mlflow, comet_ml, aim,
    # clearml, dvclive, swanlab, trackio: each once its package is installed); []: metrics.jsonl only
    trackers: list[str] = dataclasses.field(default_factory=lambda: ["tensorboard"])
    peak_tflops: Union[float, None] = None  # device peak for MFU; null: known GPU table, or measured matmul peak on CPU
    # Steps between records of each block's mean attention distance (attention_distance_<block>, pixels) on a fixed
    # batch: the first attention_images images of the first training shard; 0: off (python -m mpp.analyze draws it)
    attention_every: int = 0
    attention_images: int = 32

    def validate(self, prefix: str) -> None:
        from mpp.runlog import check_tracker_names
        check_tracker_names(self.trackers, prefix)
        if self.attention_images < 1:
            raise ConfigError(f"{prefix}attention_images={self.attention_images}: the batch needs at least one image")


@dataclasses.dataclass
class Resolved:
    """Written by the run into its saved config (any value given is replaced): what the mixed precision and
    compile settings resolved to on its machine, and why, e.g. "auto → no (bf16 matmul 0.9 GFLOP/s vs fp32 87 on
    this CPU)". The resolved values themselves are in their own keys, so a saved config reruns as it ran."""
    mixed_precision: Union[str, None] = None
    compile: Union[str, None] = None


@dataclasses.dataclass
class CheckpointConfig:
    every: int = 1000               # steps between checkpoints (one is also written at the end)
    keep: int = 3                   # newest checkpoints kept


# ---- Evaluation and fine-tuning (issue 5): linprobe.py, knn.py, finetune.py, and pretraining's online kNN. ----

@dataclasses.dataclass
class LabelledDataConfig:
    train: Union[str, list[str], None] = None  # labelled shards: what the probe / kNN bank / fine-tune trains on
    train_split: str = "train"
    val: Union[str, list[str], None] = None  # evaluation shards; null: the same spec as `train`
    val_split: str = "val"
    num_workers: int = 8            # loader processes per rank
    batch_size: int = 256           # per process, for feature extraction and evaluation
    shuffle_buffer: int = 5000      # fine-tuning's training stream
    crop_pct: float = 0.875         # evaluation centre crop: resize the short side to img_size / crop_pct
    mean: list[float] = dataclasses.field(default_factory=lambda: list(IMAGENET_MEAN))
    std: list[float] = dataclasses.field(default_factory=lambda: list(IMAGENET_STD))


@dataclasses.dataclass
class FeatureConfig:
    pool: Literal["cls", "mean"] = "cls"  # class token (MAE's probe) or the mean of the patch tokens
    blocks: int = 1                 # concatenate the features of the last k blocks, each through the final norm


@dataclasses.dataclass
class KnnConfig:
    k: int = 20                     # neighbours voting (DINO)
    temperature: float = 0.07       # votes weighted by exp(cosine similarity / temperature)


@dataclasses.dataclass
class ProbeConfig:
    optimizer: Literal["lars", "sgd", "adamw"] = "lars"
    batch_size: int = 16384         # global; the head is trained on every process alike (see linprobe.py)
    epochs: int = 90
    warmup_epochs: float = 10
    # A small data set in big batches gives the head too few updates to converge: the batch shrinks to give each
    # epoch at least min_epoch_steps updates, and epochs are added up to min_steps updates in all.
    min_epoch_steps: int = 10
    min_steps: int = 1000
    base_lr: float = 0.1            # lr = base_lr * batch_size / 256
    min_lr: float = 0.0
    weight_decay: float = 0.0
    momentum: float = 0.9           # lars, sgd
    augment: bool = True            # random-resized crop + flip, features extracted anew every epoch (MAE);
                                    # false: centre crops, features extracted once and cached
    cache: Literal["memory", "disk"] = "memory"  # where extracted features live; disk: reused by later runs


@dataclasses.dataclass
class EvalConfig:
    """linprobe.py and knn.py: a frozen encoder judged on labelled shards."""
    output_dir: Union[str, None] = None  # default runs/<recipe name>
    seed: int = 0
    ckpt: Union[str, None] = None   # checkpoint folder, run folder or exported .safetensors; none: random init
    model: ModelConfig = dataclasses.field(default_factory=ModelConfig)  # the encoder's shape (decoder keys unused)
    data: LabelledDataConfig = dataclasses.field(default_factory=LabelledDataConfig)
    features: FeatureConfig = dataclasses.field(default_factory=FeatureConfig)
    probe: ProbeConfig = dataclasses.field(default_factory=ProbeConfig)
    knn: KnnConfig = dataclasses.field(default_factory=KnnConfig)
    mixed_precision: Literal["auto", "bf16", "fp16", "no"] = "auto"  # as train.mixed_precision
    cpu_threads: Union[int, None] = None
    resolved: Resolved = dataclasses.field(default_factory=Resolved)


@dataclasses.dataclass
class OnlineKnnConfig:
    """Pretraining's kNN accuracy every `every` steps on a small labelled set."""
    every: int = 0                  # steps between evaluations; 0: off. data.mean/std: pretraining's are used
    # (nested sections take their schema defaults key by key: a recipe, not a factory here, sets other ones)
    data: LabelledDataConfig = dataclasses.field(default_factory=LabelledDataConfig)
    features: FeatureConfig = dataclasses.field(default_factory=FeatureConfig)
    knn: KnnConfig = dataclasses.field(default_factory=KnnConfig)


@dataclasses.dataclass
class PretrainConfig:
    output_dir: Union[str, None] = None  # default runs/<recipe name>
    seed: int = 0
    resume: Union[str, None] = None  # auto: newest checkpoint in output_dir, if any; or a checkpoint path
    model: ModelConfig = dataclasses.field(default_factory=ModelConfig)
    data: DataConfig = dataclasses.field(default_factory=DataConfig)
    train: TrainConfig = dataclasses.field(default_factory=TrainConfig)
    optim: OptimConfig = dataclasses.field(default_factory=OptimConfig)
    log: LogConfig = dataclasses.field(default_factory=LogConfig)
    checkpoint: CheckpointConfig = dataclasses.field(default_factory=CheckpointConfig)
    resolved: Resolved = dataclasses.field(default_factory=Resolved)
    knn: OnlineKnnConfig = dataclasses.field(default_factory=OnlineKnnConfig)

    def validate(self, prefix: str) -> None:
        check_attention_logging(self, prefix)


def check_attention_logging(cfg, prefix: str) -> None:
    """log.attention_every reads the attention of transformer blocks between grid positions, which only the
    ViT-backed encoders have (refused here, not at the first record mid-run)."""
    from mpp.models import TOKENIZERS
    if cfg.log.attention_every > 0 and not TOKENIZERS[cfg.model.tokenizer]["vit"]:
        raise ConfigError(f"{prefix}log.attention_every={cfg.log.attention_every}: the mean attention distance needs "
                          f"attention between grid positions, which {prefix}model.tokenizer={cfg.model.tokenizer} has "
                          f"not: set {prefix}log.attention_every=0 (python -m mpp.analyze draws its tokens' maps)")


@dataclasses.dataclass
class FinetuneConfig:
    """finetune.py: a timm ViT classifier initialised from a pretrained encoder."""
    num_classes: Union[int, None] = None  # null: the manifest's class count
    global_pool: Literal["avg", "token"] = "avg"  # avg: mean of patch tokens + fc_norm (MAE); token: class token
    drop_path: float = 0.1
    layer_decay: float = 0.65       # lr of block i scaled by decay^(depth - i) (timm parameter groups)
    mixup: float = 0.8              # mixup alpha; 0: off
    cutmix: float = 1.0             # cutmix alpha; 0: off
    label_smoothing: float = 0.1
    rand_augment: Union[str, None] = "rand-m9-mstd0.5-inc1"  # timm auto_augment spec; null: off
    reprob: float = 0.25            # random erasing probability
    ema: bool = False               # keep an exponential moving average of the weights, evaluated beside them
    ema_decay: float = 0.9999


@dataclasses.dataclass
class FinetuneRunConfig:
    output_dir: Union[str, None] = None  # default runs/<recipe name>
    seed: int = 0
    resume: Union[str, None] = None  # auto: newest checkpoint in output_dir, if any; or a checkpoint path
    ckpt: Union[str, None] = None   # pretrained weights (any stage); none: from scratch
    model: ModelConfig = dataclasses.field(default_factory=ModelConfig)  # img_size may differ from pretraining
    data: LabelledDataConfig = dataclasses.field(default_factory=LabelledDataConfig)
    finetune: FinetuneConfig = dataclasses.field(default_factory=FinetuneConfig)
    train: TrainConfig = dataclasses.field(default_factory=TrainConfig)
    optim: OptimConfig = dataclasses.field(default_factory=OptimConfig)
    log: LogConfig = dataclasses.field(default_factory=LogConfig)
    checkpoint: CheckpointConfig = dataclasses.field(default_factory=CheckpointConfig)
    resolved: Resolved = dataclasses.field(default_factory=Resolved)

    def validate(self, prefix: str) -> None:
        check_attention_logging(self, prefix)
