"""The analyses `python -m mpp.analyze` runs, one class each: `measure` a subject (one checkpoint's encoder,
and its pretraining model where the weights hold the head) into numbers, `panel` draws one subject's numbers;
mpp.analyze puts the subjects' panels side by side and writes the numbers as JSON. An analysis that does
not apply to a subject says why (`skipped`), and its panel says so.

Every encoder kind: the attention analyses read the transformer blocks over the token grid (a hybrid's and a
T2T-ViT's backbone, its tokens `patch_size` = the tokenizer's total stride apart in pixels); VT has no such
attention (its tokens are no grid positions) and gets the visual tokens' spatial attention instead.
A new analysis is one more class in ANALYSES.
"""
from __future__ import annotations

import dataclasses
import math

import torch
import torch.nn.functional as F
from PIL import Image
from torchvision.utils import make_grid

from mpp.visualize import masked_forward, reconstruction_grid

from . import draw
from .attention import attention_distances, block_attentions, class_token_maps, token_centres
from .embeddings import first_filters, position_similarity, principal_components
from .visual_tokens import spatial_softmaxes, token_maps


@dataclasses.dataclass
class Subject:
    """One checkpoint as the analyses see it."""
    label: str
    ckpt: str
    model_cfg: object                  # config.ModelConfig
    encoder: torch.nn.Module           # eval mode, frozen
    model: torch.nn.Module | None      # the pretraining model (encoder + head) when the weights hold its head
    mean: list[float]
    std: list[float]
    notes: list[str]

    def inputs(self, images: torch.Tensor) -> torch.Tensor:
        """uint8 (B, C, H, W) -> normalised float on the encoder's device, as in pretraining."""
        device = next(self.encoder.parameters()).device
        mean = torch.tensor(self.mean, device=device).view(1, -1, 1, 1)
        std = torch.tensor(self.std, device=device).view(1, -1, 1, 1)
        return (images.to(device).float() / 255 - mean) / std


@dataclasses.dataclass
class Options:
    images: int = 128        # attention distance: averaged over this many images
    show: int = 8            # reconstructions and class-token maps: this many images
    components: int = 28     # principal components of the filters shown (the ViT paper: 28)
    batch_size: int = 32
    seed: int = 0            # the reconstructions' masks


def skipped(reason: str) -> dict:
    return {"skipped": reason}


def no_grid_attention(encoder, what: str) -> str:
    """Why an encoder without timm attention blocks over its token grid has no `what` (an attention analysis)."""
    if spatial_softmaxes(encoder) is not None:
        return (f"VT has no {what}: it attends among its visual tokens and from map positions to tokens, never "
                f"between two grid positions (its tokens' spatial attention: vt_token_maps)")
    return "its blocks have no timm Attention modules"


class Analysis:
    name = ""          # file stem: NAME.png, NAME.json
    title = ""
    description = ""   # one line under the title, and in the JSON

    def measure(self, subject: Subject, images: torch.Tensor, options: Options) -> dict:
        """JSON-ready numbers (keys starting with "_" hold tensors for `panel` and are not written), or
        skipped(reason)."""
        raise NotImplementedError

    def panel(self, result: dict, results: list[dict]) -> Image.Image:
        """One subject's panel; `results`: every subject's, for scales shared across the figure."""
        raise NotImplementedError


class AttentionDistance(Analysis):
    name = "attention_distance"
    title = "Mean attention distance"
    description = ("per head (dots, one colour per head) and block: the pixel distance from each patch query to "
                   "the patch keys, weighted by attention, mean over queries and images; bars: the block's mean; "
                   "dashed: uniform attention")

    def measure(self, subject, images, options):
        enc = subject.encoder
        if block_attentions(enc) is None:
            return skipped(no_grid_attention(enc, "query-key distance on the grid"))
        result = attention_distances(enc, subject.inputs(images[:options.images]), options.batch_size)
        centres = token_centres(enc.grid, enc.patch_size)
        return {"images": min(len(images), options.images), "tokenizer": subject.model_cfg.tokenizer,
                "grid": list(enc.grid), "patch_size": enc.patch_size,
                "uniform": torch.cdist(centres, centres).mean().item(),
                "diagonal": torch.cdist(centres, centres).max().item(), **result}

    def panel(self, result, results):
        top = max(r["diagonal"] for r in results if "skipped" not in r)
        return draw.scatter(result["distance"], max(top, 1e-6), "block", "mean attention distance (px)",
                            means=result["layer_mean"], reference=result["uniform"])


class PositionSimilarity(Analysis):
    name = "pos_embed_similarity"
    title = "Position embedding similarity"
    description = ("tile (r, c): the cosine similarity of the embedding of grid position (r, c) with that of every "
                   "other position, laid out on the grid; each panel on its own colour scale")

    def measure(self, subject, images, options):
        similarity = position_similarity(subject.encoder)
        if similarity is None:
            return skipped("the encoder has no position embedding over its token grid")
        return {"grid": list(subject.encoder.grid), "pos_embed": subject.model_cfg.pos_embed,
                "similarity": similarity.tolist()}

    def panel(self, result, results):
        # Each panel's colour scale runs from its lowest similarity (to one decimal) to 1: sin-cos embeddings are
        # all alike above 0.7, and a scale shared with learned ones (or -1..1) paints them one colour.
        low = min(math.floor(min(map(min, result["similarity"])) * 10) / 10, 0.9)
        h, w = result["grid"]
        maps = torch.tensor(result["similarity"]).view(h * w, h, w)
        figure = draw.to_pil(draw.tiles(maps, columns=w, anchors=draw.SEQUENTIAL, low=low, high=1.0))
        return draw.stack([figure, draw.colorbar(min(figure.width, 300), draw.SEQUENTIAL, low, 1, "cosine similarity")])


class PatchFilters(Analysis):
    name = "patch_filters"
    title = "Principal components of the patch-embedding filters"
    description = ("the top principal components of the first layer that reads pixels (a patch ViT's projection, "
                   "a hybrid's or VT's first convolution, T2T's value projection of its first soft split's windows), "
                   "each scaled to its own range; first = largest")

    def measure(self, subject, images, options):
        found = first_filters(subject.encoder, subject.model_cfg.in_chans)
        if found is None:
            return skipped("no convolution or linear layer on the pixels found in patch_embed or backbone")
        filters, source = found
        components, share = principal_components(filters.cpu(), options.components)
        return {"source": source, "filters": list(filters.shape), "variance_share": share.tolist(),
                "components": components.tolist()}

    def panel(self, result, results):
        components = torch.tensor(result["components"])
        low = components.flatten(1).min(1).values.view(-1, 1, 1, 1)
        high = components.flatten(1).max(1).values.view(-1, 1, 1, 1)
        shown = (components - low) / (high - low).clamp(min=1e-12)
        if shown.shape[1] != 3:  # grey (or more channels than RGB): their mean
            shown = shown.mean(1, keepdim=True).expand(-1, 3, -1, -1)
        grid = make_grid(draw.enlarge(shown, 40), nrow=7, padding=3, pad_value=1.0)
        share = sum(result["variance_share"])
        caption = draw.text_panel(f"{len(components)} components: {share:.0%} of the filters' variance "
                                  f"({result['filters'][0]} filters of {'x'.join(map(str, result['filters'][1:]))})",
                                  width=max(grid.shape[-1], 200))
        return draw.stack([draw.to_pil(grid), caption])


class Reconstructions(Analysis):
    name = "reconstructions"
    title = "Reconstructions of held-out images"
    description = ("per image: original | masked (hidden patches grey) | prediction | prediction with the visible "
                   "patches pasted back; the same masks for every checkpoint of one shape")

    def measure(self, subject, images, options):
        model = subject.model
        if model is None:
            return skipped("the weights hold no pretraining head (a fine-tuned or exported encoder; "
                           "python -m mpp.export --with-decoder keeps it)")
        imgs = subject.inputs(images[:options.show])
        grid = reconstruction_grid(model, imgs, subject.mean, subject.std, options.seed)
        if grid is None:
            return skipped(f"model.target.kind={subject.model_cfg.target.kind} predicts no pixels")
        out = masked_forward(model, imgs, options.seed)
        return {"images": len(imgs), "mask_seed": options.seed, "objective": subject.model_cfg.objective,
                "target": subject.model_cfg.target.kind, "mask_ratio": subject.model_cfg.mask.ratio,
                "loss": out.terms["reconstruction"].item(), "_grid": grid}

    def panel(self, result, results):
        return draw.to_pil(result["_grid"])


class ClassTokenAttention(Analysis):
    name = "cls_attention"
    title = "Class-token attention"
    description = ("per image: the image | the last block's class-token attention over the patches (mean of the "
                   "heads) | attention rollout over all blocks; each map scaled to its maximum")

    def measure(self, subject, images, options):
        if block_attentions(subject.encoder) is None:
            return skipped(no_grid_attention(subject.encoder, "class token (it classifies its tokens' mean)"))
        shown = images[:options.show]
        maps = class_token_maps(subject.encoder, subject.inputs(shown))
        if maps is None:
            return skipped("the encoder has no class token")
        return {"images": len(shown), "grid": list(subject.encoder.grid),
                **{name: m.cpu().tolist() for name, m in maps.items()}, "_images": shown.float().cpu() / 255}

    def panel(self, result, results):
        images = result["_images"]
        columns = [images]
        for name in ("last", "rollout"):
            maps = torch.tensor(result[name])
            maps = maps / maps.flatten(1).max(1).values.view(-1, 1, 1)
            heat = draw.colorize(F.interpolate(maps[:, None], size=images.shape[-2:], mode="nearest")[:, 0])
            columns.append(0.35 * images.mean(1, keepdim=True) + 0.65 * heat.movedim(0, 1))
        rows = torch.stack(columns, dim=1).flatten(0, 1)
        return draw.to_pil(make_grid(draw.enlarge(rows, 96), nrow=3, padding=2, pad_value=1.0))


class VisualTokenMaps(Analysis):
    name = "vt_token_maps"
    title = "Visual tokens' spatial attention (VT)"
    description = ("per image, one row per VT module: the image | each visual token's weights over the feature "
                   "map (its tokenizer's softmax over positions), each map scaled to its maximum")

    def measure(self, subject, images, options):
        if spatial_softmaxes(subject.encoder) is None:
            return skipped("no visual tokens: only VT's tokenizers draw tokens from the map by a spatial softmax")
        shown = images[:options.show]
        maps = token_maps(subject.encoder, subject.inputs(shown))
        kinds = ["filter-based" if i == 0 else "recurrent" for i in range(len(maps))]
        return {"images": len(shown), "grid": list(subject.encoder.grid), "tokens": maps[0].shape[1],
                "modules": kinds, "maps": [m.cpu().tolist() for m in maps], "_images": shown.float().cpu() / 255}

    def panel(self, result, results):
        images = result["_images"]  # (B, 3, S, S)
        maps = torch.tensor(result["maps"])  # (modules, B, L, h, w)
        maps = maps / maps.flatten(-2).max(-1).values[..., None, None]
        heat = draw.colorize(F.interpolate(maps.flatten(0, 1), size=images.shape[-2:], mode="nearest"))
        heat = heat.movedim(0, 2).unflatten(0, maps.shape[:2])  # (modules, B, L, 3, S, S)
        overlay = 0.35 * images.mean(1, keepdim=True)[None, :, None] + 0.65 * heat
        rows = torch.cat([images[None, :, None].expand(len(maps), -1, -1, -1, -1, -1), overlay], dim=2)
        rows = rows.transpose(0, 1).flatten(0, 2)  # image by image, its modules' rows in order
        grid = make_grid(draw.enlarge(rows, 64), nrow=result["tokens"] + 1, padding=2, pad_value=1.0)
        caption = draw.text_panel(f"rows: {result['images']} images x modules ({', '.join(result['modules'])}); "
                                  f"columns: the image, then tokens 1 to {result['tokens']}", width=grid.shape[-1])
        return draw.stack([draw.to_pil(grid), caption])


ANALYSES = [AttentionDistance(), PositionSimilarity(), PatchFilters(), Reconstructions(), ClassTokenAttention(),
            VisualTokenMaps()]
