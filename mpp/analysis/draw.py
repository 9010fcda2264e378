"""Figures with PIL and torchvision alone (no plotting library in the dependencies): colour maps, tiles of
maps, a scatter plot with axes, and panels side by side under their labels.

Images are float tensors (3, H, W) in [0, 1] until `to_pil`; colour maps are piecewise linear between a few
anchor colours (matplotlib's inferno and viridis), enough to read a figure at a glance.
"""
from __future__ import annotations

import math

import torch
from PIL import Image, ImageDraw, ImageFont
from torchvision.transforms.functional import to_pil_image
from torchvision.utils import make_grid

HEAT = ((0, 0, 4), (87, 16, 110), (188, 55, 84), (249, 142, 9), (252, 255, 164))  # 0 .. 1 (inferno)
SEQUENTIAL = ((68, 1, 84), (59, 82, 139), (33, 145, 140), (94, 201, 98), (253, 231, 37))  # low .. high (viridis)
# One colour per head (tab10, then two more): heads are told apart within a layer, not named.
HEAD_COLOURS = ((31, 119, 180), (255, 127, 14), (44, 160, 44), (214, 39, 40), (148, 103, 189), (140, 86, 75),
                (227, 119, 194), (127, 127, 127), (188, 189, 34), (23, 190, 207), (0, 0, 128), (128, 128, 0))
BACKGROUND, INK = (255, 255, 255), (0, 0, 0)
FONT_SIZE = 13


def font(size: int = FONT_SIZE) -> ImageFont.ImageFont:
    try:
        return ImageFont.load_default(size=size)  # a scalable font where Pillow has FreeType
    except (TypeError, OSError):
        return ImageFont.load_default()


def colorize(values: torch.Tensor, anchors=HEAT) -> torch.Tensor:
    """values in [0, 1], any shape (...) -> (3, ...) float RGB in [0, 1], linear between the anchor colours."""
    table = torch.tensor(anchors, dtype=torch.float32) / 255
    position = values.float().clamp(0, 1) * (len(anchors) - 1)
    low = position.floor().long().clamp(max=len(anchors) - 2)
    frac = (position - low).unsqueeze(-1)
    rgb = table[low] * (1 - frac) + table[low + 1] * frac
    return rgb.movedim(-1, 0)


def enlarge(imgs: torch.Tensor, at_least: int) -> torch.Tensor:
    """(..., H, W) images scaled up by a whole factor (nearest: pixels stay sharp) to at least `at_least` px."""
    factor = max(1, math.ceil(at_least / imgs.shape[-1]))
    return imgs.repeat_interleave(factor, -2).repeat_interleave(factor, -1)


def tiles(maps: torch.Tensor, columns: int, anchors, low: float, high: float, cell_target: int = 400,
          gap: int = 2) -> torch.Tensor:
    """(K, h, w) maps -> one image, K tiles in rows of `columns`, each map coloured from low..high and scaled
    up so that a row is about `cell_target` px wide."""
    k, h, w = maps.shape
    scale = max(1, cell_target // (columns * w))
    coloured = colorize((maps - low) / (high - low), anchors).movedim(0, 1)  # (K, 3, h, w)
    return make_grid(enlarge(coloured, w * scale), nrow=columns, padding=gap, pad_value=1.0)


def to_pil(img: torch.Tensor) -> Image.Image:
    return to_pil_image(img.clamp(0, 1).cpu())


def text_size(text: str, size: int = FONT_SIZE) -> tuple[int, int]:
    left, top, right, bottom = ImageDraw.Draw(Image.new("RGB", (1, 1))).textbbox((0, 0), text, font=font(size))
    return right - left, bottom - top


def colorbar(width: int, anchors, low: float, high: float, caption: str) -> Image.Image:
    """A horizontal colour scale with its end values and a caption."""
    ramp = colorize(torch.linspace(0, 1, width - 40).view(1, -1).expand(10, -1), anchors)
    bar = Image.new("RGB", (width, 34), BACKGROUND)
    bar.paste(to_pil(ramp), (20, 0))
    draw = ImageDraw.Draw(bar)
    draw.text((20, 12), f"{low:g}", fill=INK, font=font(11))
    draw.text((width - 20, 12), f"{high:g}", fill=INK, font=font(11), anchor="ra")
    draw.text((width // 2, 12), caption, fill=INK, font=font(11), anchor="ma")
    return bar


def stack(images: list[Image.Image], gap: int = 4) -> Image.Image:
    """Images one under the other, centred."""
    width = max(i.width for i in images)
    out = Image.new("RGB", (width, sum(i.height for i in images) + gap * (len(images) - 1)), BACKGROUND)
    y = 0
    for image in images:
        out.paste(image, ((width - image.width) // 2, y))
        y += image.height + gap
    return out


def nice_step(span: float, most: int = 6) -> float:
    """A tick step of 1, 2 or 5 times a power of ten giving at most `most` intervals over `span`."""
    raw = span / most
    power = 10 ** math.floor(math.log10(raw)) if raw > 0 else 1
    return next(m * power for m in (1, 2, 5, 10) if m * power >= raw)


def scatter(columns: list[list[float]], y_max: float, x_label: str, y_label: str, width: int = 440,
            height: int = 320, means: list[float] | None = None, reference: float | None = None) -> Image.Image:
    """One column of dots per x position 0..len(columns) - 1, the i-th dot of a column in the i-th head colour;
    `means`: a short black bar per column; `reference`: a dashed grey line at that y. y from 0 to y_max."""
    left, right, top, bottom = 58, 12, 10, 42
    img = Image.new("RGB", (width, height), BACKGROUND)
    draw = ImageDraw.Draw(img)
    x0, x1, y0, y1 = left, width - right, height - bottom, top
    n = len(columns)
    x_of = lambda i: x0 + (i + 0.5) * (x1 - x0) / n
    y_of = lambda v: y0 - (y0 - y1) * min(v, y_max) / y_max
    small = font(11)
    step = nice_step(y_max)
    for k in range(int(y_max / step + 1e-9) + 1):
        y = y_of(k * step)
        draw.line([(x0 - 4, y), (x0, y)], fill=INK)
        draw.line([(x0 + 1, y), (x1, y)], fill=(235, 235, 235))
        draw.text((x0 - 6, y), f"{k * step:g}", fill=INK, font=small, anchor="rm")
    every = max(1, math.ceil(n / 12))
    for i in range(n):
        if i % every == 0 or i == n - 1:
            draw.line([(x_of(i), y0), (x_of(i), y0 + 4)], fill=INK)
            draw.text((x_of(i), y0 + 6), str(i), fill=INK, font=small, anchor="ma")
    draw.line([(x0, y1), (x0, y0), (x1, y0)], fill=INK)
    if reference is not None:
        for start in range(x0, x1, 10):
            draw.line([(start, y_of(reference)), (min(start + 5, x1), y_of(reference))], fill=(120, 120, 120))
    for i, column in enumerate(columns):
        for head, value in enumerate(column):
            x, y = x_of(i), y_of(value)
            draw.ellipse([x - 3, y - 3, x + 3, y + 3], fill=HEAD_COLOURS[head % len(HEAD_COLOURS)])
        if means is not None:
            half = 0.3 * (x1 - x0) / n
            draw.line([(x_of(i) - half, y_of(means[i])), (x_of(i) + half, y_of(means[i]))], fill=INK, width=2)
    draw.text(((x0 + x1) / 2, height - 4), x_label, fill=INK, font=font(12), anchor="md")
    label = Image.new("RGB", text_size(y_label, 12), BACKGROUND)
    ImageDraw.Draw(label).text((0, 0), y_label, fill=INK, font=font(12), anchor="lt")
    label = label.rotate(90, expand=True)
    img.paste(label, (4, int((y0 + y1) / 2 - label.height / 2)))
    return img


def wrap(text: str, width: int, size: int = 12) -> list[str]:
    """`text` in lines at most `width` px wide (words kept whole)."""
    lines, line = [], ""
    for word in text.split():
        candidate = f"{line} {word}".strip()
        if line and text_size(candidate, size)[0] > width:
            lines.append(line)
            candidate = word
        line = candidate
    return lines + [line]


def text_panel(message: str, width: int = 300) -> Image.Image:
    """A panel saying why there is no figure (wrapped to `width`)."""
    lines = wrap(message, width - 20)
    img = Image.new("RGB", (width, 20 + 18 * len(lines)), (245, 245, 245))
    draw = ImageDraw.Draw(img)
    for k, text in enumerate(lines):
        draw.text((10, 10 + 18 * k), text, fill=(90, 90, 90), font=font(12))
    return img


def side_by_side(panels: list[Image.Image], labels: list[str], title: str = "", subtitle: str = "",
                 gap: int = 16) -> tuple[Image.Image, list[dict]]:
    """Panels in a row, each under its label, below a title and a smaller subtitle (wrapped to the panels'
    width); returns the figure and each panel's {"label", "box": [x0, y0, x1, y1]} (its pixels, not its label)."""
    label_height = max(text_size(label, FONT_SIZE + 1)[1] for label in labels) + 10
    widths = [max(p.width, text_size(label, FONT_SIZE + 1)[0] + 8) for p, label in zip(panels, labels)]
    width = max(sum(widths) + gap * (len(panels) + 1), 520)
    heading = [(title, FONT_SIZE + 3, INK)] if title else []
    heading += [(line, 12, (80, 80, 80)) for line in (wrap(subtitle, width - 2 * gap) if subtitle else [])]
    line_height = lambda size: text_size("Ag", size)[1] + 6
    top = gap // 2 + sum(line_height(size) for _, size, _ in heading) + 4
    figure = Image.new("RGB", (width, top + label_height + max(p.height for p in panels) + gap), BACKGROUND)
    draw = ImageDraw.Draw(figure)
    y = gap // 2
    for text, size, colour in heading:
        draw.text((gap, y), text, fill=colour, font=font(size))
        y += line_height(size)
    boxes, x = [], gap
    for panel, label, column in zip(panels, labels, widths):
        draw.text((x + column // 2, top + 4), label, fill=INK, font=font(FONT_SIZE + 1), anchor="ma")
        left = x + (column - panel.width) // 2
        figure.paste(panel, (left, top + label_height))
        boxes.append({"label": label, "box": [left, top + label_height, left + panel.width,
                                              top + label_height + panel.height]})
        x += column + gap
    return figure, boxes
