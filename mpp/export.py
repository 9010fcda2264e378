"""Export an encoder: `python -m mpp.export CKPT OUT.safetensors`.

CKPT is any stage's output (checkpoint folder, run folder, an earlier export, a .pth). Every export stores the
run's config in its metadata, so `mpp.models.load_encoder(OUT)` rebuilds the encoder without a recipe. Where
timm has the architecture (patch ViTs; hybrids on timm's ResNetV2 stem and layers: vit_*_r50_s16_* ...) the
file holds exactly the keys of timm's model, so `timm.create_model(NAME, pretrained=True,
pretrained_cfg_overlay=dict(file=OUT, ...), ...)` loads it strictly; the exact call is printed and
stored in the file's metadata. The overlay sets:
- num_classes: equal to the model's, so timm keeps its strict load (when they differ timm drops the
  classifier and loads non-strictly, hiding missing keys);
- custom_load=False: the registry's default weights of some names are .npz files with their own loader;
- input_size, mean, std: what the encoder was trained on, so timm.data.resolve_model_data_config
  builds the right preprocessing.

--with-decoder adds what a reconstruction needs beside the encoder (the objective's head and block fusion)
for demos, under `decoder.<model key>` (a bare `mask_token` key would make timm's checkpoint filter take
the file for a DINOv2 one). mpp reads such a file back: load_into_vit for the encoder,
build_model(...).load_state_dict(weights.model_state(state), strict=False) for the whole model; timm loads
its encoder with pretrained_strict=False (the printed call says so).
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

from .models.vit import VIT_SIZES
from .weights import CONFIG_METADATA, DECODER_PREFIX, decoder_state, read_weights, vit_state


# timm's registered name for each size; its patch size is in the name, its image size is 224.
TIMM_NAMES = {
    "tiny": ("vit_tiny_patch16_224", 16),
    "small": ("vit_small_patch16_224", 16),
    "base": ("vit_base_patch16_224", 16),
    "large": ("vit_large_patch16_224", 16),
    "huge": ("vit_huge_patch14_224", 14),
}
FORMAT = "mpp-export/1"


def describe(state: dict[str, torch.Tensor], config: dict | None) -> dict:
    """Architecture of a timm-keyed ViT state: size, image and patch size, channels, head, pooling.

    Read from the weights themselves (the config can be absent, e.g. for a .pth); the number of
    heads, which no weight shows, comes from the size's entry in VIT_SIZES."""
    if "patch_embed.proj.weight" not in state or "pos_embed" not in state:
        raise ValueError("no ViT encoder in these weights (patch_embed.proj.weight / pos_embed missing)")
    width, in_chans, patch, patch_w = state["patch_embed.proj.weight"].shape
    depth = len({k.split(".")[1] for k in state if k.startswith("blocks.")})
    size = next((n for n, (w, d, _) in VIT_SIZES.items() if (w, d) == (width, depth)), None)
    if size is None or patch != patch_w:
        raise ValueError(f"width {width}, depth {depth}, patch {patch}x{patch_w} is none of mpp's ViT sizes "
                         f"({', '.join(f'{n}: width {w}, depth {d}' for n, (w, d, _) in VIT_SIZES.items())})")
    saved = (config or {}).get("model") or {}
    if saved.get("encoder", size) != size:
        raise ValueError(f"the weights are a ViT-{size} but the stored config says model.encoder={saved['encoder']}")
    positions = state["pos_embed"].shape[1] - 1  # one class token
    grid = int(positions ** 0.5)
    if grid * grid != positions:
        raise ValueError(f"pos_embed has {positions} patch positions: not a square grid")
    head = state.get("head.weight")
    return dict(encoder=size, img_size=grid * patch, patch_size=patch, in_chans=in_chans,
                num_classes=0 if head is None else head.shape[0],
                global_pool="avg" if "fc_norm.weight" in state and "norm.weight" not in state else "token")


def describe_rebuilt(raw: dict, config: dict | None, source: str) -> tuple[dict, tuple[str, dict] | None]:
    """(the architecture as `describe` gives it, timm's (name, size keywords) or None) of an encoder that is not a
    patch ViT, read from the stored config and checked by loading the weights into the encoder it builds."""
    from .models import rebuild_encoder
    from .models.hybrid import timm_hybrid
    encoder, cfg = rebuild_encoder(raw, config, source)
    state = encoder.state_dict()
    arch = dict(tokenizer=cfg.tokenizer, encoder=cfg.encoder, img_size=cfg.img_size, patch_size=cfg.patch_size,
                in_chans=cfg.in_chans, num_classes=state["head.weight"].shape[0] if "head.weight" in state else 0,
                global_pool="avg" if "fc_norm.weight" in state and "norm.weight" not in state else "token")
    timm_name = timm_hybrid(cfg.encoder, cfg.hybrid.layers, cfg.hybrid.stem) if cfg.tokenizer == "hybrid" else None
    return arch, timm_name


def timm_call(arch: dict, file: str, data: dict | None = None, strict: bool = True,
              timm_name: tuple[str, dict] | None = None) -> tuple[str, dict, dict]:
    """(name, create_model kwargs, pretrained_cfg_overlay) for the architecture `describe` found; timm_name:
    a hybrid's (name, size keywords), whose patch size (1, on the CNN's map) is timm's default."""
    if timm_name is None:
        name, default_patch = TIMM_NAMES[arch["encoder"]]
        size = {}
    else:
        (name, size), default_patch = timm_name, arch["patch_size"]
    overlay = dict(file=file, custom_load=False, num_classes=arch["num_classes"],
                   input_size=(arch["in_chans"], arch["img_size"], arch["img_size"]))
    if data and data.get("mean") and data.get("std"):
        overlay.update(mean=tuple(data["mean"]), std=tuple(data["std"]))
    kwargs = dict(num_classes=arch["num_classes"], **size)
    if arch["global_pool"] != "token":
        kwargs["global_pool"] = arch["global_pool"]
    if arch["img_size"] != 224:
        kwargs["img_size"] = arch["img_size"]
    if arch["patch_size"] != default_patch:
        kwargs["patch_size"] = arch["patch_size"]
    if arch["in_chans"] != 3:
        kwargs["in_chans"] = arch["in_chans"]
    if not strict:
        kwargs["pretrained_strict"] = False
    return name, kwargs, overlay


def timm_command(name: str, kwargs: dict, overlay: dict) -> str:
    args = lambda d: ", ".join(f"{k}={v!r}" for k, v in d.items())
    return f"timm.create_model({name!r}, pretrained=True, pretrained_cfg_overlay=dict({args(overlay)}), {args(kwargs)})"


def check_against_timm(state: dict[str, torch.Tensor], name: str, kwargs: dict) -> None:
    """The exported keys and shapes must be exactly timm's model's (built on the meta device: no memory)."""
    import timm
    build = {k: v for k, v in kwargs.items() if k != "pretrained_strict"}
    with torch.device("meta"):
        model = timm.create_model(name, pretrained=False, **build)
    want = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    have = {k: tuple(v.shape) for k, v in state.items()}
    if want != have:
        missing, extra = sorted(set(want) - set(have)), sorted(set(have) - set(want))
        shapes = [f"{k} {have[k]} vs {want[k]}" for k in sorted(set(want) & set(have)) if want[k] != have[k]]
        raise ValueError(f"the weights do not match timm's {name}({', '.join(f'{k}={v!r}' for k, v in build.items())}): "
                         f"missing {missing[:5]}, unexpected {extra[:5]}, other shapes {shapes[:5]}")


def export(ckpt: str | Path, out: str | Path, with_decoder: bool = False) -> dict:
    """Write `out` and return its metadata (all strings, as safetensors requires)."""
    from safetensors.torch import save_file
    out = Path(out)
    if out.suffix != ".safetensors":
        raise ValueError(f"output {str(out)!r} must end in .safetensors")
    raw, config = read_weights(ckpt)
    state = vit_state(raw)
    tokenizer = ((config or {}).get("model") or {}).get("tokenizer", "patch")
    if tokenizer == "patch":  # read from the weights themselves: a .pth without a config exports too
        arch, timm_name = {**describe(state, config), "tokenizer": tokenizer}, None
    else:
        arch, timm_name = describe_rebuilt(raw, config, str(ckpt))
    timm_fields = {}
    if tokenizer == "patch" or timm_name is not None:
        name, kwargs, overlay = timm_call(arch, str(out), (config or {}).get("data"), strict=not with_decoder,
                                          timm_name=timm_name)
        check_against_timm(state, name, kwargs)
        timm_fields = {"timm_model": name, "timm_kwargs": json.dumps(kwargs),
                       "timm_command": timm_command(name, kwargs, overlay)}
    if with_decoder:
        decoder = decoder_state(raw)
        if not decoder:
            raise ValueError(f"--with-decoder: {ckpt} has no pretraining head (is it a pretraining checkpoint?)")
        state = {**state, **{DECODER_PREFIX + k: v for k, v in decoder.items()}}
    metadata = {
        "format": "pt",  # Hugging Face's loaders expect this key
        "mpp_format": FORMAT,
        **timm_fields,
        "tokenizer": arch["tokenizer"],
        "encoder": arch["encoder"],
        "img_size": str(arch["img_size"]),
        "patch_size": str(arch["patch_size"]),
        "in_chans": str(arch["in_chans"]),
        "num_classes": str(arch["num_classes"]),
        "with_decoder": str(with_decoder).lower(),
        "source": str(ckpt),
    }
    if config is not None:  # what mpp.models.load_encoder rebuilds the encoder from
        metadata[CONFIG_METADATA] = json.dumps(config)
        metadata["mpp_command"] = f"mpp.models.load_encoder({str(out)!r})"
    out.parent.mkdir(parents=True, exist_ok=True)
    save_file({k: v.detach().contiguous() for k, v in state.items()}, str(out), metadata=metadata)
    return metadata


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m mpp.export", description=__doc__.split("\n\n")[0])
    parser.add_argument("ckpt", help="checkpoint folder, run folder (newest checkpoint), exported .safetensors or .pth")
    parser.add_argument("out", help="output file, .safetensors")
    parser.add_argument("--with-decoder", action="store_true",
                        help="also keep the pretraining head (as decoder.<key>) for reconstruction demos")
    args = parser.parse_args(argv)
    try:
        meta = export(args.ckpt, args.out, args.with_decoder)
    except (FileNotFoundError, ValueError, OSError) as err:
        print(f"mpp.export: error: {err}", file=sys.stderr)
        return 2
    print(f"wrote {args.out}: {meta['encoder']}/{meta['patch_size']} ({meta['tokenizer']} tokenizer) at "
          f"{meta['img_size']} px{', with decoder' if args.with_decoder else ''} (from {args.ckpt})")
    if "timm_command" in meta:
        print("load it with timm:")
        print("  import timm")
        print(f"  model = {meta['timm_command']}")
        if args.with_decoder:
            print("  (timm loads the encoder and reports the decoder.* keys as unexpected)")
    else:
        print(f"timm has no such model ({meta['tokenizer']} tokenizer, {meta['encoder']})")
    if "mpp_command" in meta:
        print("or with mpp:" if "timm_command" in meta else "load it with mpp:")
        print("  import mpp.models")
        print(f"  model = {meta['mpp_command']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
