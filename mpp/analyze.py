"""See inside encoders: `python -m mpp.analyze CKPT [--compare CKPT2 ...] [--data SHARDS] [--out DIR]`.

CKPT is any stage's output (checkpoint folder, run folder, an export, a .pth) or `none`, a randomly initialised
encoder. Writes, for every checkpoint side by side (PNG) with the numbers behind each figure (JSON):
  attention_distance    mean attention distance of every head of every block (the ViT paper's figure 7, right)
  pos_embed_similarity  cosine similarity of every position embedding with every other (figure 7, centre)
  patch_filters         principal components of the patch-embedding filters (figure 7, left)
  reconstructions       held-out images restored, for checkpoints that hold a pixel-predicting head
  cls_attention         the class token's attention in the last block, and attention rollout
  vt_token_maps         VT: each visual token's spatial attention over the feature map (its tokenizer's softmax)
and analysis.json: the checkpoints, their models, notes and the images used.

Every encoder kind (model.tokenizer): a hybrid's and a T2T-ViT's attention analyses read their backbone's
blocks, the tokens `patch_size` (the tokenizer's total stride) pixels apart; the filters are a hybrid's or VT's
first convolution (weight-standardised as it convolves) and T2T's value projection of its first soft split's
windows (patch_filters.json names the layer). An analysis that does not apply (VT has no attention between grid
positions nor a class token; a HOG target predicts no pixels) is skipped: its JSON gives the reason.

The model's shape comes from the config stored with the weights; for weights without one (a .pth, `none`),
from --recipe (with --set key=value overrides), else, for `none`, from the first checkpoint that has one.
"""
from __future__ import annotations

import argparse
import dataclasses
import sys
from pathlib import Path

import torch

from mpp.analysis.draw import side_by_side, text_panel
from mpp.analysis.figures import ANALYSES, Options, Subject
from mpp.config import IMAGENET_MEAN, IMAGENET_STD, ModelConfig
from mpp.data import ShardLoader
from mpp.fileio import write_json
from mpp.models import build_model
from mpp.recipe import ConfigError, apply_overrides, from_dict, read_recipe, to_dict
from mpp.weights import decoder_state, is_random_init, load_into_vit, read_weights

SAMPLE_DATA = Path(__file__).resolve().parent / "sample_data" / "cifar10"
JSON_DIGITS = 5


class ModelSpec:
    """A model section and the normalisation its encoder was trained with, and where they came from."""

    def __init__(self, config: dict, source: str):
        self.model = from_dict(ModelConfig, dict(config.get("model") or {}), "model.")
        data = config.get("data") or {}
        self.mean, self.std = list(data.get("mean") or IMAGENET_MEAN), list(data.get("std") or IMAGENET_STD)
        self.source = source


def recipe_spec(recipe: str | None, overrides: list[str]) -> ModelSpec | None:
    """--recipe with --set overrides (or the defaults with only --set); None when neither is given."""
    if recipe is None and not overrides:
        return None
    data = apply_overrides(read_recipe(recipe) if recipe else {}, overrides)
    return ModelSpec(data, f"--recipe {recipe}" if recipe else "--set")


def load_subject(ckpt: str, fallback: ModelSpec | None, seed: int, device: torch.device) -> Subject:
    """The checkpoint's encoder and, when its weights hold the head, its whole pretraining model; `none`: both
    randomly initialised as pretraining initialises them (seed `seed`)."""
    random_init = is_random_init(ckpt)
    raw, config = (None, None) if random_init else read_weights(ckpt)
    spec, notes = fallback, []
    if config is not None and config.get("model"):
        try:
            spec = ModelSpec(config, "the config stored with the weights")
        except ConfigError as err:
            if fallback is None:
                raise ConfigError(f"{ckpt}: its stored config does not fit this mpp's model section ({err}); pass "
                                  f"--recipe RECIPE naming its model") from None
            notes.append(f"its stored config does not fit this mpp ({err}): the model of {fallback.source} is used")
    if spec is None:
        what = "ckpt none (random init)" if random_init else f"{ckpt} holds no config naming its model:"
        raise ConfigError(f"{what} needs the model's shape: pass --recipe RECIPE (e.g. --recipe recipes/quickstart.yaml)"
                          f"{', or compare it with a checkpoint that stores one' if random_init else ''}")
    torch.manual_seed(seed)
    model = build_model(spec.model, spec.mean, spec.std)
    notes.append(f"model from {spec.source}")
    if random_init:
        notes.append(f"randomly initialised (seed {seed}, {spec.model.objective}'s initialisation)")
    else:
        notes += load_into_vit(model.encoder, raw)
    model.requires_grad_(False).eval().to(device)
    with_head = model if random_init else _with_head(model, decoder_state(raw), notes)
    label = f"random init (seed {seed})" if random_init else str(ckpt)
    return Subject(label, str(ckpt), spec.model, model.encoder, with_head, spec.mean, spec.std, notes)


def _with_head(model, head: dict, notes: list[str]):
    """The model with the head's weights loaded, or None (with a note) when the weights hold none that fits."""
    if not head:
        notes.append("no pretraining head in the weights: no reconstructions")
        return None
    try:
        result = model.load_state_dict(head, strict=False)
    except RuntimeError as err:
        notes.append(f"the weights' pretraining head does not fit the model ({str(err).splitlines()[-1].strip()}): "
                     f"no reconstructions")
        return None
    missing = [k for k in result.missing_keys if not k.startswith(("encoder.", "projector."))]
    if missing or result.unexpected_keys:
        notes.append(f"the weights' pretraining head does not fit the model (missing {missing[:3]}, unexpected "
                     f"{result.unexpected_keys[:3]}): no reconstructions")
        return None
    return model


def load_images(spec, split: str, img_size: int, count: int, crop_pct: float) -> tuple[torch.Tensor, list[str]]:
    """The first `count` images of the shards' split in their stored order, short side resized to img_size /
    crop_pct and centre-cropped: uint8 (n, 3, S, S) and their keys."""
    try:
        loader = ShardLoader(spec, mode="eval", split=split, batch_size=count, img_size=img_size, num_workers=0,
                             crop_pct=crop_pct, rank=0, world_size=1)
    except FileNotFoundError as err:
        raise FileNotFoundError(f"{err} (here: --split)") from None
    batch = next(iter(loader))
    valid = batch["valid"]
    keys = [k for k, ok in zip(batch["key"], valid.tolist()) if ok]
    return batch["image"][valid].contiguous(), keys


def json_ready(value):
    """Floats rounded to JSON_DIGITS significant digits, tensors as lists; keys starting with "_" dropped."""
    if isinstance(value, dict):
        return {k: json_ready(v) for k, v in value.items() if not k.startswith("_")}
    if isinstance(value, (list, tuple)):
        return [json_ready(v) for v in value]
    if isinstance(value, torch.Tensor):
        return json_ready(value.tolist())
    if isinstance(value, float):
        return float(f"{value:.{JSON_DIGITS}g}")
    return value


def default_out(ckpt: str) -> Path:
    if is_random_init(ckpt):
        return Path("runs") / "analysis_random_init"
    path = Path(ckpt)
    return path / "analysis" if path.is_dir() else path.with_name(f"{path.stem}_analysis")


def analyze(ckpts: list[str], out: Path, *, data=None, split: str = "val", recipe: str | None = None,
            overrides: list[str] = (), options: Options = Options(), crop_pct: float = 1.0, device=None) -> dict:
    """Run every analysis on every checkpoint; write OUT/<analysis>.png and .json and OUT/analysis.json.
    Returns analysis.json's content."""
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    fallback = recipe_spec(recipe, list(overrides))
    subjects: dict[int, Subject] = {}
    # Checkpoints with weights first: a `none` without --recipe takes the first stored model.
    for index in sorted(range(len(ckpts)), key=lambda i: is_random_init(ckpts[i])):
        ckpt = ckpts[index]
        spec = fallback
        if is_random_init(ckpt) and spec is None and subjects:
            first = next(iter(subjects.values()))
            spec = ModelSpec({"model": to_dict(first.model_cfg), "data": {"mean": first.mean, "std": first.std}},
                             f"{first.ckpt} (its stored config)")
        subjects[index] = load_subject(ckpt, spec, options.seed, device)
    subjects = [subjects[i] for i in range(len(ckpts))]

    data = str(data or SAMPLE_DATA)
    images, keys = {}, {}
    for size in sorted({s.model_cfg.img_size for s in subjects}):
        images[size], keys[size] = load_images(data, split, size, max(options.images, options.show), crop_pct)

    out.mkdir(parents=True, exist_ok=True)
    written = []
    for analysis in ANALYSES:
        results = [analysis.measure(s, images[s.model_cfg.img_size], options) for s in subjects]
        record = {"analysis": analysis.name, "title": analysis.title, "description": analysis.description,
                  "checkpoints": [{"label": s.label, "ckpt": s.ckpt, **r} for s, r in zip(subjects, results)]}
        if any("skipped" not in r for r in results):
            panels = [text_panel(f"not drawn: {r['skipped']}") if "skipped" in r else analysis.panel(r, results)
                      for r in results]
            figure, boxes = side_by_side(panels, [s.label for s in subjects], analysis.title, analysis.description)
            figure.save(out / f"{analysis.name}.png")
            record["panels"] = boxes
            written.append(out / f"{analysis.name}.png")
        write_json(out / f"{analysis.name}.json", json_ready(record))
        written.append(out / f"{analysis.name}.json")
    summary = {"checkpoints": [{"label": s.label, "ckpt": s.ckpt, "model": to_dict(s.model_cfg), "mean": s.mean,
                                "std": s.std, "notes": s.notes} for s in subjects],
               "images": {"data": data, "split": split, "crop_pct": crop_pct,
                          "count": {str(size): len(v) for size, v in images.items()},
                          "keys": {str(size): v for size, v in keys.items()}},
               "options": dataclasses.asdict(options),
               "device": str(device), "torch": torch.__version__, "files": [p.name for p in written]}
    write_json(out / "analysis.json", json_ready(summary))
    return summary


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m mpp.analyze", description=__doc__.split("\n\n")[0],
                                     epilog="Example: python -m mpp.analyze runs/quickstart --compare none")
    parser.add_argument("ckpt", help="checkpoint folder, run folder (newest checkpoint), export (.safetensors), "
                                     ".pth, or none (random init)")
    parser.add_argument("--compare", nargs="+", default=[], metavar="CKPT",
                        help="more checkpoints (or none) drawn beside the first in every figure")
    parser.add_argument("--data", help=f"shards of the images (any data.train spec); default: the shipped sample "
                                       f"({SAMPLE_DATA.relative_to(SAMPLE_DATA.parents[2])})")
    parser.add_argument("--split", default="val", help="split of a manifest to read (default: val, held out)")
    parser.add_argument("--out", help="output folder; default: CKPT/analysis for a folder, CKPT_analysis beside "
                                      "a file, runs/analysis_random_init for none")
    parser.add_argument("--recipe", help="a recipe whose model section is the model of weights that store no "
                                         "config (a .pth) and of none")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", dest="overrides",
                        help="override a key of --recipe, e.g. --set model.pos_embed=learned (repeatable)")
    parser.add_argument("--images", type=int, default=Options.images,
                        help="images the attention distance is averaged over (default %(default)s)")
    parser.add_argument("--show", type=int, default=Options.show,
                        help="images in the reconstruction and class-token figures (default %(default)s)")
    parser.add_argument("--components", type=int, default=Options.components,
                        help="principal components of the filters shown (default %(default)s)")
    parser.add_argument("--batch-size", type=int, default=Options.batch_size)
    parser.add_argument("--seed", type=int, default=Options.seed,
                        help="the random init of none and the reconstructions' masks (default %(default)s)")
    parser.add_argument("--crop-pct", type=float, default=1.0,
                        help="centre crop: resize the short side to size / crop_pct (default 1: the whole image)")
    parser.add_argument("--device", help="default: cuda if available, else cpu")
    args = parser.parse_args(argv)
    if min(args.images, args.show, args.components, args.batch_size) < 1:
        parser.error("--images, --show, --components and --batch-size must be at least 1")
    ckpts = [args.ckpt, *args.compare]
    out = Path(args.out) if args.out else default_out(args.ckpt)
    options = Options(images=args.images, show=args.show, components=args.components, batch_size=args.batch_size,
                      seed=args.seed)
    try:
        summary = analyze(ckpts, out, data=args.data, split=args.split, recipe=args.recipe, overrides=args.overrides,
                          options=options, crop_pct=args.crop_pct, device=args.device)
    except (ConfigError, FileNotFoundError, ValueError, OSError) as err:
        print(f"mpp.analyze: error: {err}", file=sys.stderr)
        return 2
    for entry in summary["checkpoints"]:
        print(f"{entry['label']}: " + "; ".join(entry["notes"]))
    print(f"wrote {out}/: {', '.join(summary['files'])} and analysis.json")
    return 0


if __name__ == "__main__":
    sys.exit(main())
