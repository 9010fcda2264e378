"""Reading tar archives header by header: the one tar-header parser of mpp and data_tools.

`read_header` turns a 512-byte header block into (name, size, type flag); `TarStream` walks an
archive with it, following pax and GNU long-name records, and can skip a member's data without
reading it. tarfile decodes every field of every header and keeps them all; webdataset's tar
iterator is tarfile in stream mode, which cannot seek past the samples a resumed epoch or a
later worker's slice skips. data_tools lists source archives with `read_header` too.
"""
from __future__ import annotations

from typing import NamedTuple

BLOCK = 512
ZERO_BLOCK = bytes(BLOCK)  # two of them end an archive
CHECKSUM = slice(148, 156)
MTIME = slice(136, 148)


class TarFormatError(ValueError):
    """A tar header that does not parse (a corrupt or not-a-tar stream)."""


class TarHeader(NamedTuple):
    name: str  # ustar's prefix joined to the name; pax and GNU long names come in records of their own
    size: int
    kind: bytes  # the type flag: b"0"/b"\0" file, b"5" folder, b"x"/b"g" pax, b"L" GNU long name, ...


def tar_number(field: bytes) -> int:
    """A numeric header field: octal text, or GNU's base-256 (high bit set) for values octal cannot hold."""
    if field[:1] and field[0] & 0x80:
        return int.from_bytes(field, "big", signed=False) & ~(0x80 << (8 * (len(field) - 1)))
    text = field.split(b"\0", 1)[0].strip()
    try:
        return int(text, 8) if text else 0
    except ValueError:
        raise TarFormatError(f"bad number field {field!r} in a tar header") from None


def read_header(block: bytes) -> TarHeader:
    """The name, size and type flag of a 512-byte header block whose checksum holds; TarFormatError otherwise."""
    if tar_number(block[CHECKSUM]) != sum(block) - sum(block[CHECKSUM]) + 8 * ord(" "):
        raise TarFormatError("tar header checksum mismatch (corrupt or not a tar)")
    name = block[:100].split(b"\0", 1)[0].decode("utf-8", "surrogateescape")
    if block[257:263] == b"ustar\0":  # POSIX ustar: long paths are split into prefix/name
        prefix = block[345:500].split(b"\0", 1)[0].decode("utf-8", "surrogateescape")
        if prefix:
            name = prefix + "/" + name
    return TarHeader(name, tar_number(block[124:136]), block[156:157])


def _pax_records(data: bytes) -> dict:
    records, pos = {}, 0
    while pos < len(data):
        space = data.find(b" ", pos)
        if space < 0:
            break
        length = int(data[pos:space])
        if length <= 0:
            break
        key, _, value = data[space + 1:pos + length - 1].partition(b"=")
        records[key.decode("utf-8", "surrogateescape")] = value.decode("utf-8", "surrogateescape")
        pos += length
    return records


class TarStream:
    """A minimal tar reader (ustar, pax and GNU long names) that can skip member data without reading it:
    it seeks over skipped data when the stream can seek, and checks header checksums."""

    def __init__(self, stream, seekable: bool):
        self.stream, self.seekable = stream, seekable
        self.pending = 0  # bytes of the current member (data and padding) not consumed yet
        self.size = 0

    def _skip(self, n: int) -> None:
        if n <= 0:
            return
        if self.seekable:
            self.stream.seek(n, 1)
            return
        while n > 0:
            chunk = self.stream.read(min(n, 1 << 20))
            if not chunk:
                raise EOFError("unexpected end of tar data")
            n -= len(chunk)

    def _read(self, n: int) -> bytes:
        data = self.stream.read(n)
        if len(data) != n:
            raise EOFError(f"unexpected end of tar data ({len(data)} of {n} bytes)")
        return data

    def next(self):
        """(name, size) of the next regular file, or None at the end of the archive."""
        self._skip(self.pending)
        self.pending = 0
        long_name, pax = None, {}
        while True:
            block = self.stream.read(BLOCK)
            if len(block) < BLOCK:
                if not block:
                    return None  # the end, without end-of-archive blocks (tolerated, as tarfile does)
                raise EOFError("truncated tar header")
            if block == ZERO_BLOCK:
                return None
            name, size, kind = read_header(block)
            if kind in (b"x", b"g", b"L"):
                data = self._read((size + 511) & ~511)[:size]
                if kind == b"x":
                    pax = _pax_records(data)
                elif kind == b"L":
                    long_name = data.rstrip(b"\0").decode("utf-8", "surrogateescape")
                continue
            name = pax.get("path", long_name or name)
            size = int(pax.get("size", size))
            padded = (size + 511) & ~511
            if kind in (b"0", b"\0", b"7"):
                self.pending, self.size = padded, size
                return name, size
            self._skip(padded)  # directories, links and other entries carry no sample data
            long_name, pax = None, {}

    def read(self) -> bytes:
        """The data of the member `next` returned."""
        data = self._read(self.size)
        self.pending -= self.size
        self._skip(self.pending)
        self.pending = 0
        return data
