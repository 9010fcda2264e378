"""Check one image's bytes and turn them into what a shard stores: copied, or shrunk and re-encoded."""

import contextlib
import io
import warnings
from dataclasses import dataclass

from PIL import ExifTags, Image, ImageOps

from mpp.jpeg import jpeg_size

# PIL format -> the sample field (file extension) it is stored under. MPO is how PIL names a
# camera JPEG that carries extra frames; its first frame is an ordinary JPEG.
FIELD_OF_FORMAT = {"JPEG": "jpg", "MPO": "jpg", "PNG": "png", "WEBP": "webp", "BMP": "bmp", "TIFF": "tif"}
IMAGE_FIELDS = ("jpg", "jpeg", "png", "webp", "bmp", "tif", "tiff")
OUTPUT_FORMATS = {"jpg": "JPEG", "png": "PNG", "webp": "WEBP"}


class Rejected(Exception):
    """A file that is not a usable image; `reason` is a short category, the message the detail."""

    def __init__(self, reason, detail):
        super().__init__(detail)
        self.reason = reason


@dataclass(frozen=True)
class Encoding:
    """How images are written. `output_format` is "keep" or a key of OUTPUT_FORMATS."""

    output_format: str = "keep"
    quality: int = 90
    resize_short_side: int | None = None
    reencode: bool = True  # False: copy the original bytes after header checks only

    @property
    def changes_sizes(self):
        """Whether written images may differ in size from the originals."""
        return self.reencode and (self.output_format != "keep" or self.resize_short_side is not None)


@dataclass
class Prepared:
    field: str  # the sample field: jpg, png, ...
    data: bytes
    width: int  # of the original image
    height: int


@contextlib.contextmanager
def pixel_limit(max_pixels):
    """Make PIL refuse images over `max_pixels` (decompression bombs): it raises an error above
    twice its MAX_IMAGE_PIXELS and only warns above it, so the warning becomes an error too."""
    saved = Image.MAX_IMAGE_PIXELS
    Image.MAX_IMAGE_PIXELS = max_pixels
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            yield
    finally:
        Image.MAX_IMAGE_PIXELS = saved


def open_image(data):
    """Open `data` reading the header only; raise Rejected for anything that is not a usable image."""
    if not data:
        raise Rejected("empty file", "the file has zero bytes")
    try:
        image = Image.open(io.BytesIO(data))
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as error:
        raise Rejected("decompression bomb", f"{error} (--max-pixels is {Image.MAX_IMAGE_PIXELS:,})") from None
    except Image.UnidentifiedImageError:
        raise Rejected("not an image", f"not an image file (starts with {data[:16]!r})") from None
    except Exception as error:  # PIL raises many kinds of errors on malformed headers
        raise Rejected(damage(error), f"unreadable image header: {type(error).__name__}: {error}") from None
    if image.format not in FIELD_OF_FORMAT:
        raise Rejected(
            "unsupported format",
            f"{image.format} image; supported: {', '.join(sorted(set(FIELD_OF_FORMAT.values())))}",
        )
    return image


def damage(error):
    """The reason to give for a PIL error on reading an image."""
    return "truncated" if "truncated" in str(error).lower() else "corrupt"


JPEG_CUT_SHORT = "the JPEG has no end-of-image marker: the file is cut short"


def check_complete(image, data):
    """Catch a truncated file without decoding it, for --no-reencode.

    Decoding is what proves an image whole, but it costs 610 us for a 320 px JPEG against 80 us
    for the header (measured on this project's CPU; `tar -cf` takes 60-110 us per file), and
    copying aims at tar's speed. PIL verifies PNG chunk checksums without decoding (`verify`) but
    has no such check for JPEG, so a JPEG must end with its end-of-image marker: JPEG escapes
    0xFF in coded data, so FF D9 near the end is that marker (some writers pad after it).
    """
    try:
        if image.format == "PNG":
            image.verify()
        elif image.format in ("JPEG", "MPO") and data.rfind(b"\xff\xd9", max(0, len(data) - 4096)) < 0:
            raise Rejected("truncated", JPEG_CUT_SHORT)
    except Rejected:
        raise
    except Exception as error:
        raise Rejected("truncated", f"{type(error).__name__}: {error}") from None


def checked_copy(data):
    """--no-reencode: the original bytes, once the header and the end of the file are checked. A JPEG's
    size comes from its frame header (mpp/jpeg.py): PIL's Image.open took a quarter of the time
    of copying imagewoof320, against a target of twice `tar -cf`'s time; other formats go to PIL."""
    size = jpeg_size(data)
    if size is None:
        image = open_image(data)
        check_complete(image, data)
        return Prepared(FIELD_OF_FORMAT[image.format], data, *image.size)
    width, height = size
    limit = Image.MAX_IMAGE_PIXELS  # what PIL's open refuses under pixel_limit; None: no limit
    if limit and width * height > limit:
        raise Rejected("decompression bomb", f"{width}x{height} = {width * height:,} pixels "
                                             f"(--max-pixels is {limit:,})")
    if data.rfind(b"\xff\xd9", max(0, len(data) - 4096)) < 0:
        raise Rejected("truncated", JPEG_CUT_SHORT)
    return Prepared("jpg", data, width, height)


def prepare(data, encoding):
    """The stored form of one image. --no-reencode: the original bytes after header checks.
    --format keep: the original bytes after a full decode, unless the image is shrunk to
    --resize-short-side or EXIF-rotated, then re-encoded in its own format. --format jpg/png/webp:
    every image decoded, shrunk if asked, turned upright and re-encoded in that format."""
    if not encoding.reencode:
        return checked_copy(data)
    image = open_image(data)
    width, height = image.size
    field = FIELD_OF_FORMAT[image.format]

    short_side = encoding.resize_short_side
    try:
        if short_side is not None and min(width, height) > short_side:
            scale = short_side / min(width, height)
            # thumbnail keeps the aspect ratio and decodes a JPEG at a reduced scale where it can (draft)
            image.thumbnail((max(short_side, round(width * scale)), max(short_side, round(height * scale))))
        else:
            image.load()  # a full decode: the check that the file is whole
    except Exception as error:
        raise Rejected(damage(error), f"cannot decode: {type(error).__name__}: {error}") from None
    try:
        rotated = image.getexif().get(ExifTags.Base.Orientation, 1) not in (1, None)
        if encoding.output_format == "keep" and image.size == (width, height) and not rotated:
            return Prepared(field, data, width, height)  # re-encoding as it was would only lose quality
        image = ImageOps.exif_transpose(image)  # the EXIF tag is not written, so apply it to the pixels
        target_field = field if encoding.output_format == "keep" else encoding.output_format
        return Prepared(*encode(image, target_field, encoding.quality), width, height)
    except Exception as error:  # odd modes or EXIF that PIL cannot convert or write
        raise Rejected("cannot re-encode", f"{image.mode} {image.format} image: {type(error).__name__}: {error}") from None


def encode(image, field, quality):
    """(field, bytes) of `image` saved as `field`; BMP and TIFF are saved as PNG."""
    output_format = OUTPUT_FORMATS.get(field)
    if output_format is None:  # --format keep on a BMP or TIFF that had to be shrunk or rotated
        field, output_format = "png", "PNG"
    has_alpha = image.mode in ("RGBA", "LA", "PA") or "transparency" in image.info
    if output_format == "JPEG" or not has_alpha:
        mode = "L" if image.mode in ("1", "L") else "RGB"
    else:
        mode = "RGBA"
    if image.mode != mode:
        image = image.convert(mode)
    buffer = io.BytesIO()
    options = {"quality": quality} if output_format in ("JPEG", "WEBP") else {}
    image.save(buffer, output_format, **options)
    return field, buffer.getvalue()
