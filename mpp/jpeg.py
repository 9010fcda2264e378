"""A JPEG's size from its frame header, without PIL: what the loader needs to plan a draft decode and
--no-reencode needs to check an image at tar's speed (PIL's Image.open parses every segment). No
dependencies, so mpp and data_tools share it.
"""

_SOF_MARKERS = frozenset((0xC0, 0xC1, 0xC2, 0xC3, 0xC5, 0xC6, 0xC7, 0xC9, 0xCA, 0xCB, 0xCD, 0xCE, 0xCF))


def jpeg_size(data: bytes):
    """(width, height) from a JPEG's frame header, or None if `data` does not parse as a JPEG."""
    if data[:2] != b"\xff\xd8":
        return None
    pos, end = 2, len(data)
    while pos + 4 <= end:
        if data[pos] != 0xFF:
            return None
        marker = data[pos + 1]
        if marker == 0xFF:  # fill byte
            pos += 1
            continue
        if marker == 0x01 or 0xD0 <= marker <= 0xD8:  # markers without a length
            pos += 2
            continue
        if marker in _SOF_MARKERS:
            if pos + 9 > end:
                return None
            height, width = (data[pos + 5] << 8) | data[pos + 6], (data[pos + 7] << 8) | data[pos + 8]
            return (width, height) if width and height else None
        if marker == 0xDA:  # scan data before any frame header
            return None
        pos += 2 + ((data[pos + 2] << 8) | data[pos + 3])
    return None
