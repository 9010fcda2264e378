"""Weights from any stage's output into an encoder: `load_weights` (a timm `VisionTransformer`: `load_into_vit`).

Every stage writes the encoder under timm's own key names (mpp's encoder *is* timm's class), so
loading is a key filter plus three adaptations, each reported as a note:
- a position embedding of another grid is resampled bicubically (the ViT paper's recipe for a new
  resolution, as timm's and MAE's fine-tuning do);
- the final LayerNorm moves between `norm` (class-token models) and `fc_norm` (models that pool the
  patch tokens first): both are the encoder's last LayerNorm;
- a classifier head is loaded only when asked for and its shape fits.
Anything else that does not fit is a different model: a ValueError names the key, both shapes, what
they mean, and the setting that fixes it.
"""
from __future__ import annotations

import json
import math
from pathlib import Path

import torch
import yaml
from timm.layers import resample_abs_pos_embed

from .checkpoint import CHECKPOINT_DIR, list_checkpoints
from .models.vit import VIT_SIZES

WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin")  # what accelerate's save_state writes, newest format first
ACCEPTED = ("a checkpoint folder (output_dir/checkpoints/step_XXXXXXXX), a run folder (its newest checkpoint is "
            "used), a file written by `python -m mpp.export` (.safetensors) or a state dict (.pth/.bin/.pt)")
CONFIG_METADATA = "mpp_config"  # export's safetensors metadata key holding the run's config as JSON
NORMS = ("norm", "fc_norm")
DECODER_PREFIX = "decoder."  # export --with-decoder: the pretraining head's keys under this prefix, beside timm's


def is_random_init(ckpt) -> bool:
    """Whether `ckpt` is "none": a randomly initialised encoder, the baseline, rather than a weights file."""
    return ckpt is not None and str(ckpt).lower() == "none"


def read_weights(path: str | Path) -> tuple[dict[str, torch.Tensor], dict | None]:
    """(state dict as saved, the run's config as a dict if known) from any stage's output."""
    path = Path(path)
    file = weights_file(path)
    if file != path:  # a checkpoint's weights: its config.yaml lies beside them
        config_file = file.parent / "config.yaml"
        config = yaml.safe_load(config_file.read_text()) if config_file.is_file() else None
        return _load_file(file), config
    return _load_file(path), _file_config(path)


def weights_file(path: str | Path) -> Path:
    """The file `read_weights(path)` reads: a folder's (newest checkpoint's) weights file, or `path` itself."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"weights {str(path)!r} not found; pass {ACCEPTED}")
    if not path.is_dir():
        return path
    folder = _checkpoint_folder(path)
    return next(folder / name for name in WEIGHT_FILES if (folder / name).is_file())


def _checkpoint_folder(path: Path) -> Path:
    if any((path / name).is_file() for name in WEIGHT_FILES):
        return path
    run = path.parent if path.name == CHECKPOINT_DIR else path  # output_dir/checkpoints works too
    found = list_checkpoints(run)
    for candidate in reversed(found):  # newest complete checkpoint that holds model weights
        if any((candidate / name).is_file() for name in WEIGHT_FILES):
            return candidate
    raise FileNotFoundError(f"{str(path)!r} is a folder with no {' or '.join(WEIGHT_FILES)} and no checkpoint under "
                            f"{CHECKPOINT_DIR}/step_*; pass {ACCEPTED}")


def _load_file(file: Path) -> dict[str, torch.Tensor]:
    if file.suffix == ".safetensors":
        from safetensors.torch import load_file
        return load_file(str(file))
    try:
        obj = torch.load(file, map_location="cpu", weights_only=True)
    except Exception as err:  # pickles with code in them, truncated files, other formats
        raise ValueError(f"cannot read weights from {str(file)!r} ({err}); pass {ACCEPTED}") from err
    # MAE's and DeiT's released files wrap the state dict: {"model": ...}; Lightning-style: {"state_dict": ...}
    for wrapper in ("model", "state_dict"):
        if isinstance(obj, dict) and isinstance(obj.get(wrapper), dict):
            obj = obj[wrapper]
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise ValueError(f"{str(file)!r} does not hold a state dict (name -> tensor); pass {ACCEPTED}")
    return obj


def _file_config(file: Path) -> dict | None:
    """The config that `mpp.export` stores in a safetensors file's metadata, if any."""
    if file.suffix != ".safetensors":
        return None
    from safetensors import safe_open
    with safe_open(str(file), framework="pt") as f:
        text = (f.metadata() or {}).get(CONFIG_METADATA)
    return json.loads(text) if text else None


def _key_parts(key: str) -> list[str]:
    """A key without DDP's `module.` and torch.compile's `_orig_mod.` wrappers, split at dots."""
    parts = [p for p in key.split(".") if p != "_orig_mod"]
    while parts and parts[0] == "module":
        parts = parts[1:]
    return parts


ENCODER = "encoder"  # a pretraining model's encoder submodule: what probes, fine-tuning and exports read
PRETRAINING_ONLY = ("projector",)  # the contrastive term's head: nothing reads it after pretraining


def _is_pretraining_state(keys) -> bool:
    return any(_key_parts(k)[:1] == [ENCODER] for k in keys)


def vit_state(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """timm VisionTransformer keys of any stage's state dict.

    A pretraining model's encoder is its `encoder` submodule (encoder.<timm key>): those keys are kept and
    everything else (the objective's head, fusion, projector) is dropped. Fine-tuned and exported states
    are timm keys already; an export's `decoder.` keys (--with-decoder) are dropped. DDP's `module.` and
    torch.compile's `_orig_mod.` wrappers are removed.
    """
    pretraining = _is_pretraining_state(state)
    out = {}
    for key, value in state.items():
        parts = _key_parts(key)
        if pretraining and parts[:1] == [ENCODER]:
            out[".".join(parts[1:])] = value
        elif not pretraining and parts and parts[0] != DECODER_PREFIX.rstrip("."):
            out[".".join(parts)] = value
    return out


def decoder_state(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """What a reconstruction needs beside the encoder (the objective's head, block fusion), under the pretraining
    model's own keys, from a pretraining state or an export made with --with-decoder; empty if there is none."""
    out = {}
    pretraining = _is_pretraining_state(state)
    for key, value in state.items():
        parts = _key_parts(key)
        if pretraining and parts and parts[0] not in (ENCODER, *PRETRAINING_ONLY):
            out[".".join(parts)] = value
        elif not pretraining and parts[:1] == [DECODER_PREFIX.rstrip(".")]:
            out[".".join(parts[1:])] = value
    return out


def model_state(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A pretraining model's keys (encoder.<timm key>, head.*, fusion.*) from a pretraining state or an export
    made with --with-decoder, for `build_model(...).load_state_dict(..., strict=False)` (the projector, if any,
    is not exported)."""
    return {**{f"{ENCODER}.{k}": v for k, v in vit_state(state).items()}, **decoder_state(state)}


def _source(state_or_path) -> tuple[dict, dict | None, str]:
    if isinstance(state_or_path, (str, Path)):
        raw, config = read_weights(state_or_path)
        return raw, config, str(state_or_path)
    return state_or_path, None, "the given state dict"


def load_weights(encoder: torch.nn.Module, state_or_path, *, head: bool = False) -> list[str]:
    """Load weights into any mpp encoder in place; returns notes on what was adapted. A timm VisionTransformer
    (tokenizers patch, hybrid, t2t) gets load_into_vit's adaptations; another encoder (VT) takes the saved keys
    as they are: all of them but the classifier head must be there with the encoder's shapes, else ValueError."""
    from timm.models.vision_transformer import VisionTransformer
    if isinstance(encoder, VisionTransformer):
        return load_into_vit(encoder, state_or_path, head=head)
    raw, config, source = _source(state_or_path)
    state, own = vit_state(raw), encoder.state_dict()
    body = lambda keys: {k for k in keys if not k.startswith("head.")}
    missing, extra = sorted(body(own) - set(state)), sorted(body(state) - set(own))
    shapes = [f"{k}: checkpoint {tuple(state[k].shape)} vs model {tuple(own[k].shape)}"
              for k in sorted(body(own) & set(state)) if state[k].shape != own[k].shape]
    if missing or extra or shapes:
        raise ValueError(f"{source} does not fit the {type(encoder).__name__}: missing {missing[:5]}, unexpected "
                         f"{extra[:5]}, other shapes {shapes[:5]}; build the model the checkpoint was trained with"
                         f"{_saved_settings(config)}")
    load = {k: state[k] for k in body(own)}
    notes: list[str] = []
    _head(encoder, own, state, load, notes, head)
    encoder.load_state_dict(load, strict=False)
    return notes


def load_into_vit(vit: torch.nn.Module, state_or_path, *, head: bool = False) -> list[str]:
    """Load weights into a timm VisionTransformer in place; returns notes on what was adapted.

    `state_or_path`: a state dict (any stage's keys) or a path `read_weights` accepts. Every key of
    `vit` except head.*, norm.*, fc_norm.* must be in the checkpoint with the same shape (pos_embed
    may have another grid: resampled), else ValueError. `pos_embed.requires_grad` is left as it was.
    """
    raw, config, source = _source(state_or_path)
    state = vit_state(raw)
    own = vit.state_dict()
    notes: list[str] = []
    load: dict[str, torch.Tensor] = {}

    # Patch embedding first: its shape says width, channels and patch size at once, the clearest message.
    ordered = sorted(own, key=lambda k: k != "patch_embed.proj.weight")
    for key in ordered:
        if key.startswith("head.") or key.split(".")[0] in NORMS:
            continue
        target = own[key]
        if key not in state:
            raise ValueError(f"{key}: missing from {source} (model {tuple(target.shape)}); "
                             f"{_model_hint(vit, state, config)}")
        value = state[key]
        if key == "pos_embed" and value.shape != target.shape:
            value = _resample_pos_embed(vit, value, target, source, config, notes)
        elif value.shape != target.shape:
            raise ValueError(_mismatch(key, value.shape, target.shape, vit, source, config))
        load[key] = value

    _final_norm(own, state, load, notes)
    _head(vit, own, state, load, notes, head)

    handled = set(load) | {k for k in state if k.startswith("head.") or k.split(".")[0] in NORMS}
    extra = sorted(set(state) - handled)
    if extra:
        raise ValueError(f"{source} has weights the model lacks: {', '.join(extra[:5])}"
                         f"{' ...' if len(extra) > 5 else ''}; {_model_hint(vit, state, config)}")
    result = vit.load_state_dict(load, strict=False)
    assert not result.unexpected_keys, result.unexpected_keys  # every key of `load` came from vit.state_dict()
    return notes


# ---- adaptations ----

def _resample_pos_embed(vit, value, target, source, config, notes) -> torch.Tensor:
    prefix = 0 if getattr(vit, "no_embed_class", False) else vit.num_prefix_tokens
    new_grid = tuple(vit.patch_embed.grid_size)
    if value.ndim != 3 or value.shape[-1] != target.shape[-1]:
        raise ValueError(_mismatch("pos_embed", value.shape, target.shape, vit, source, config))
    old_grid = _saved_grid(config, value.shape[1] - prefix) or _square_grid(value.shape[1] - prefix)
    if old_grid is None:
        raise ValueError(f"pos_embed: {source} has {value.shape[1] - prefix} patch positions, not a square grid, "
                         f"and no config naming its image and patch size; cannot resample it to {new_grid}")
    resampled = resample_abs_pos_embed(value.float(), new_size=list(new_grid), old_size=list(old_grid),
                                       num_prefix_tokens=prefix, interpolation="bicubic", antialias=True)
    notes.append(f"pos_embed resampled bicubically from grid {old_grid[0]}x{old_grid[1]} to "
                 f"{new_grid[0]}x{new_grid[1]} (image size {_img_size(vit)})")
    return resampled.to(value.dtype)


def _final_norm(own, state, load, notes) -> None:
    """Load norm / fc_norm; if the model has one and the checkpoint only the other, copy it across."""
    for name in NORMS:
        keys = [k for k in own if k.split(".")[0] == name]
        if not keys:
            continue  # nn.Identity in this model
        other = NORMS[1 - NORMS.index(name)]
        if all(k in state for k in keys):
            source_name = name
        elif all(k.replace(name, other, 1) in state for k in keys):
            source_name = other
            notes.append(f"{other} of the checkpoint loaded as the model's {name} (both are the encoder's final "
                         f"LayerNorm; this model {'pools patch tokens before it' if name == 'fc_norm' else 'applies it to every token'})")
        else:
            notes.append(f"{name}: not in the checkpoint, kept at its initialisation")
            continue
        for key in keys:
            value = state[key.replace(name, source_name, 1)]
            if value.shape != own[key].shape:
                raise ValueError(f"{key}: checkpoint {tuple(value.shape)} vs model {tuple(own[key].shape)} "
                                 f"(the final LayerNorm's width)")
            load[key] = value


def _head(vit, own, state, load, notes, wanted: bool) -> None:
    saved = {k: v for k, v in state.items() if k.startswith("head.")}
    mine = {k: v for k, v in own.items() if k.startswith("head.")}
    if not saved:
        return
    classes = saved["head.weight"].shape[0] if "head.weight" in saved else "?"
    if not mine:
        notes.append(f"the checkpoint's classifier head ({classes} classes) is not used: the model has none")
    elif not wanted:
        notes.append(f"the checkpoint's classifier head ({classes} classes) is not loaded; the model's head "
                     f"keeps its initialisation")
    elif set(saved) == set(mine) and all(saved[k].shape == mine[k].shape for k in mine):
        load.update(saved)
        notes.append(f"classifier head loaded ({classes} classes)")
    else:
        shapes = ", ".join(f"{k} {tuple(saved[k].shape) if k in saved else None} vs {tuple(mine[k].shape)}"
                           for k in sorted(mine))
        notes.append(f"the checkpoint's classifier head does not fit the model ({shapes}); the model's head keeps "
                     f"its initialisation")


# ---- messages ----

def _square_grid(n: int) -> tuple[int, int] | None:
    side = math.isqrt(n)
    return (side, side) if side * side == n else None


def _saved_grid(config, n: int) -> tuple[int, int] | None:
    model = (config or {}).get("model") or {}
    try:
        side = int(model["img_size"]) // int(model["patch_size"])
    except (KeyError, TypeError, ValueError, ZeroDivisionError):
        return None
    return (side, side) if side * side == n else None


def _img_size(vit) -> str:
    size = vit.patch_embed.img_size
    return f"{size[0]}" if size is not None and size[0] == size[1] else f"{size}"


def _size_name(width: int) -> str | None:
    return next((name for name, (w, _, _) in VIT_SIZES.items() if w == width), None)


def _patch_tokens(vit) -> bool:
    from timm.layers import PatchEmbed
    return isinstance(getattr(vit, "patch_embed", None), PatchEmbed)


def _meaning(key: str, shape, patch: bool = True) -> str:
    shape = tuple(shape)
    if key == "patch_embed.proj.weight" and len(shape) == 4 and patch:
        return f"width {shape[0]}, {shape[1]} channels, patch {shape[2]}" + (f"x{shape[3]}" if shape[3] != shape[2] else "")
    if key == "pos_embed" and len(shape) == 3:
        grid = _square_grid(shape[1] - 1)
        where = f"grid {grid[0]}x{grid[1]} + class token" if grid else f"{shape[1]} positions"
        return f"{where}, width {shape[2]}"
    if key in ("cls_token", "reg_token") and len(shape) == 3:
        return f"width {shape[2]}"
    return f"width {shape[-1]}" if len(shape) == 1 else f"{shape[0]} outputs x {shape[1]} inputs" if len(shape) == 2 else ""


def _mismatch(key, saved_shape, model_shape, vit, source, config) -> str:
    saved, model = tuple(saved_shape), tuple(model_shape)
    fixes = []
    patch = _patch_tokens(vit)  # a hybrid's proj is a 1x1 convolution of its CNN's map: no patch to read from it
    if key == "patch_embed.proj.weight" and patch and len(saved) == len(model) == 4:
        if saved[0] != model[0]:
            name = _size_name(saved[0])
            fixes.append(f"model.encoder={name}" if name else f"an encoder of width {saved[0]}")
        if saved[1] != model[1]:
            fixes.append(f"model.in_chans={saved[1]}")
        if saved[2:] != model[2:]:
            fixes.append(f"model.patch_size={saved[2]}")
    elif saved and model and saved[-1] != model[-1] and _size_name(saved[-1]):
        fixes.append(f"model.encoder={_size_name(saved[-1])}")
    fix = f"set {', '.join(fixes)}" if fixes else "use a model of the checkpoint's shape"
    meaning = lambda shape: f" = {_meaning(key, shape, patch)}" if _meaning(key, shape, patch) else ""
    return (f"{key}: checkpoint {saved}{meaning(saved)} vs model {model}{meaning(model)}; {fix} to load "
            f"{source}{_saved_settings(config)}")


def _saved_settings(config) -> str:
    model = (config or {}).get("model")
    if not isinstance(model, dict):
        return ""
    keys = ("encoder", "img_size", "patch_size", "in_chans")
    if model.get("tokenizer", "patch") != "patch":
        keys = ("tokenizer",) + keys
    shown = ", ".join(f"{k}={model[k]}" for k in keys if k in model)
    return f" (it was trained with model: {shown})" if shown else ""


def _model_hint(vit, state, config) -> str:
    depth = len(vit.blocks)
    saved_depth = len({k.split(".")[1] for k in state if k.startswith("blocks.")})
    text = f"the checkpoint has {saved_depth} blocks and the model {depth}" if saved_depth != depth else \
        "the checkpoint is of another architecture"
    return f"{text}: is it an mpp / timm ViT of the model's size?{_saved_settings(config)}"
