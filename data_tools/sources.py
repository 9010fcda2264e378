"""Find the images of a source and read their bytes: a folder, a .tar archive, or a list file.

A source becomes a sorted list of `Candidate`s (path, class name, size, where to read it) and a
fingerprint that changes when any listed file is added, removed or changed. Reading is split
from listing so that worker processes can read any candidate without listing the source again.
"""

import csv
import hashlib
import os
import posixpath
import re
import stat
import tarfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import NamedTuple

from mpp.tar import BLOCK, MTIME, ZERO_BLOCK, TarFormatError, read_header, tar_number

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".tif", ".tiff")
LIST_EXTENSIONS = (".csv", ".tsv", ".txt", ".lst")
LIST_HEADER_NAMES = {"path", "file", "filename", "image", "img"}


class SourceError(Exception):
    """A source that cannot be sharded at all; the message names the culprit and the fix."""


class Candidate(NamedTuple):
    path: str  # as the user knows it: relative to the folder or archive, or as written in the list
    class_name: str | None
    size: int | None  # bytes; None for a listed file that does not exist
    location: str | tuple[int, int]  # a file path, or (offset, size) of a member inside the tar


@dataclass
class Source:
    kind: str  # "folder", "tar" or "list"
    path: Path
    candidates: list[Candidate]  # sorted by path
    classes: list[str]  # sorted; empty when the source has no labels
    fingerprint: str
    ignored: int = 0  # files left out for their extension or for being hidden
    labels: dict[str, int] = field(default_factory=dict)  # class name -> label

    def reader(self):
        return SourceReader(self.kind, str(self.path))


class SourceReader:
    """Reads one candidate's bytes; picklable, so each worker process opens the source itself."""

    def __init__(self, kind, path):
        self.kind, self.path, self.fd = kind, path, None

    def __getstate__(self):
        return {"kind": self.kind, "path": self.path, "fd": None}

    def read(self, location):
        if self.kind != "tar":
            with open(location, "rb") as file:
                return file.read()
        # Members are read by their recorded offset rather than through a TarFile, so a worker
        # need not scan the archive's headers again (minutes for ImageNet's 1.3M members).
        if self.fd is None:
            self.fd = os.open(self.path, os.O_RDONLY)
        offset, size = location
        data = os.pread(self.fd, size, offset)
        if len(data) != size:
            raise OSError(f"the archive ends {size - len(data)} bytes into this member")
        return data

    def close(self):
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None


def is_image_name(name):
    return name.lower().endswith(IMAGE_EXTENSIONS)


def is_hidden(path):
    # Dot files are never images: macOS writes "._x.jpg" resource forks next to every photo.
    return path.startswith(".") or "/." in path


def member_path(name):
    """A tar member's name as a relative POSIX path: "./train/x.jpg" -> "train/x.jpg"."""
    return posixpath.normpath(name).lstrip("/")


def open_source(src, labels=True):
    """List the images of SRC; `labels=False` ignores class folders and list labels."""
    path = Path(src)
    if not path.exists():
        raise SourceError(f"source does not exist: {src}")
    if path.is_dir():
        source = list_folder(path)
    elif path.suffix.lower() in LIST_EXTENSIONS:
        source = list_file(path)
    elif is_gzip(path):
        raise SourceError(
            f"{src} is compressed; a compressed archive cannot be read in place at random. "
            f"Decompress it first (e.g. `gunzip -k {src}`) and pass the .tar"
        )
    elif tarfile.is_tarfile(path):
        source = list_tar(path)
    else:
        raise SourceError(
            f"{src} is neither a folder, a .tar archive, nor a list file "
            f"({', '.join(LIST_EXTENSIONS)} with 'path[,label]' lines)"
        )
    if not source.candidates:
        raise SourceError(
            f"no images ({', '.join(e.lstrip('.') for e in IMAGE_EXTENSIONS)}, any case) in {src}"
        )
    if not labels:
        source.candidates = [c._replace(class_name=None) for c in source.candidates]
        source.classes = []
    source.labels = {name: index for index, name in enumerate(source.classes)}
    return source


def is_gzip(path):
    with open(path, "rb") as file:
        return file.read(2) == b"\x1f\x8b"


def is_folder(entry):
    """Whether a folder entry is a folder, through symlinks; a link that cannot be followed (it loops, or
    points nowhere) is not, so that an image name on it is listed, then rejected as unreadable."""
    try:
        return entry.is_dir()
    except OSError:  # ELOOP: "Too many levels of symbolic links"
        return False


def list_folder(root):
    files = []  # (relative path, size, mtime_ns)
    ignored = 0
    visited = set()  # (device, inode) of folders seen, so symlink loops end

    def walk(folder, prefix):
        nonlocal ignored
        info = folder.stat()
        if (info.st_dev, info.st_ino) in visited:
            return
        visited.add((info.st_dev, info.st_ino))
        with os.scandir(folder) as entries:
            for entry in entries:
                relative = prefix + entry.name
                if entry.name.startswith("."):
                    ignored += 1
                elif is_folder(entry):  # follows symlinks: datasets are often assembled from links
                    walk(Path(entry.path), relative + "/")
                elif is_image_name(entry.name):
                    try:
                        info = entry.stat()
                        files.append((relative, info.st_size, info.st_mtime_ns))
                    except OSError:  # a dangling or looping link: listed, and rejected when read
                        files.append((relative, None, None))
                else:
                    ignored += 1

    walk(root, "")
    files.sort()
    class_names = classes_from_folders([path for path, _, _ in files], root)
    candidates = [
        Candidate(path, name, size, str(root / path))
        for (path, size, _), name in zip(files, class_names)
    ]
    fingerprint = digest(f"{path}\t{size}\t{mtime}" for path, size, mtime in files)
    return Source("folder", root, candidates, sorted_classes(class_names), fingerprint, ignored)


def list_tar(archive_path):
    """Members of an uncompressed tar, and of the tars inside it (ImageNet's train archive holds
    one tar per class): an inner archive `n01440764.tar` reads as the folder `n01440764/`."""
    try:
        return tar_source(archive_path)
    except tarfile.TarError as error:
        raise SourceError(f"cannot read the tar archive {archive_path}: {error}; is it complete?") from None


def tar_source(archive_path):
    try:
        members, ignored = header_listing(archive_path)
    except UnusualTar:
        members, ignored = tarfile_listing(archive_path)
    members.sort()
    class_names = classes_from_folders([path for path, *_ in members], archive_path)
    candidates = [
        Candidate(path, name, size, (offset, size))
        for (path, size, offset, _), name in zip(members, class_names)
    ]
    fingerprint = digest(f"{path}\t{size}\t{offset}\t{mtime}" for path, size, offset, mtime in members)
    return Source("tar", archive_path, candidates, sorted_classes(class_names), fingerprint, ignored)


def tarfile_listing(archive_path):
    """([(path, size, absolute offset of the data, mtime)], ignored count) through tarfile: any tar it reads."""
    members = []
    ignored = 0
    with tarfile.open(archive_path, "r:") as archive:
        for member in archive:
            path = member_path(member.name)
            if not member.isfile() or is_hidden(path):
                ignored += not member.isdir()
            elif path.lower().endswith(".tar"):
                with tarfile.open(fileobj=archive.extractfile(member), mode="r:") as inner:
                    for item in inner:
                        inner_path = member_path(item.name)
                        if item.isfile() and is_image_name(inner_path) and not is_hidden(inner_path):
                            offset = member.offset_data + item.offset_data
                            members.append((f"{path[:-4]}/{inner_path}", item.size, offset, item.mtime))
                        else:
                            ignored += not item.isdir()
            elif is_image_name(path) and not member.issparse():
                members.append((path, member.size, member.offset_data, member.mtime))
            else:
                ignored += 1
    return members, ignored


class UnusualTar(Exception):
    """A tar header that header_listing leaves to tarfile: pax or GNU long-name headers, sparse
    files, a bad checksum or number field."""


FILE_TYPES = {b"0": True, b"\0": True, b"7": True, b"1": False, b"2": False, b"3": False, b"4": False,
              b"5": False, b"6": False}  # ustar type flag -> a regular file? (folders, "5", become None)


def header_listing(archive_path):
    """tarfile_listing's result read straight from the 512-byte ustar headers, for plain archives.

    tarfile builds a TarInfo with every field decoded for each member, which would make listing a large
    archive a sizeable part of --no-reencode's time. Names, sizes, types and mtimes are all a listing needs;
    anything unusual raises UnusualTar, and tarfile reads the archive instead.
    """
    members = []
    ignored = 0
    fd = os.open(archive_path, os.O_RDONLY)
    try:
        for path, is_file, size, offset, mtime in plain_headers(fd, 0):
            if not is_file or is_hidden(path):
                ignored += is_file is not None
            elif path.lower().endswith(".tar"):
                for inner_path, inner_is_file, inner_size, inner_offset, inner_mtime in \
                        plain_headers(fd, offset, offset + size):
                    if inner_is_file and is_image_name(inner_path) and not is_hidden(inner_path):
                        members.append((f"{path[:-4]}/{inner_path}", inner_size, inner_offset, inner_mtime))
                    else:
                        ignored += inner_is_file is not None
            elif is_image_name(path):
                members.append((path, size, offset, mtime))
            else:
                ignored += 1
    finally:
        os.close(fd)
    return members, ignored


def plain_headers(fd, start, end=None):
    """(path, is_file, size, data offset, mtime) of each member of the plain tar at `start` in the
    file, up to `end` (an inner tar's own end); is_file is None for a folder, False for links and devices."""
    offset = start
    while end is None or offset + BLOCK <= end:
        header = os.pread(fd, BLOCK, offset)
        if len(header) < BLOCK:
            raise UnusualTar  # cut short: tarfile says how
        if header == ZERO_BLOCK:
            return
        try:
            name, size, kind = read_header(header)
            mtime = tar_number(header[MTIME])
        except TarFormatError:
            raise UnusualTar from None  # a damaged header: tarfile says how
        is_file = FILE_TYPES.get(kind)
        if is_file is None:
            raise UnusualTar  # pax, GNU long name, sparse, ...
        if kind == b"5" or (is_file and name.endswith("/")):
            is_file = None
        path = member_path(name)
        yield path, is_file, size, offset + BLOCK, mtime
        offset += BLOCK + -(-size // BLOCK) * BLOCK


def classes_from_folders(paths, src):
    """Each image's class: its first folder below the folders that all images share.

    `train/n01440764/x.JPEG` and `n01440764/x.JPEG` both give class n01440764, so a tar of a split
    folder and the extracted folder label alike. All images directly in that common folder: no
    labels (a flat folder; a tree with a single class folder reads the same way).
    """
    if not paths:
        return []
    folders = [tuple(path.split("/")[:-1]) for path in paths]
    common = list(folders[0])
    for parts in folders[1:]:
        while parts[: len(common)] != tuple(common):
            common.pop()
    depth = len(common)
    loose = [path for path, parts in zip(paths, folders) if len(parts) == depth]
    if not loose:
        return [parts[depth] for parts in folders]
    if len(loose) == len(paths):
        return [None] * len(paths)
    in_class = next(path for path, parts in zip(paths, folders) if len(parts) > depth)
    raise SourceError(
        f"{src} mixes images in class folders (e.g. {in_class}) with loose images (e.g. {loose[0]}): "
        "move the loose images into class folders, or pass --no-labels to shard them all unlabelled"
    )


def sorted_classes(class_names):
    return sorted({name for name in class_names if name is not None})


def list_file(list_path):
    """A CSV/TSV/text file of `path[,label]` lines; paths relative to the list file's folder.

    Labels are class names (numbered in sorted order), or all non-negative integers, which are
    used as given. Blank lines, `#` comments and a header line (`path,label`) are skipped.
    """
    text = list_path.read_text(encoding="utf-8-sig")
    lines = [(number, line) for number, line in enumerate(text.splitlines(), 1)
             if line.strip() and not line.lstrip().startswith("#")]
    if not lines:
        raise SourceError(f"list file {list_path} holds no 'path[,label]' lines")
    delimiter = "\t" if list_path.suffix.lower() == ".tsv" or "\t" in lines[0][1] else ","
    rows = []
    for (number, _), row in zip(lines, csv.reader((line for _, line in lines), delimiter=delimiter)):
        row = [value.strip() for value in row]
        if len(row) > 2 or not row[0]:
            raise SourceError(f"{list_path}:{number}: expected 'path' or 'path{delimiter}label', got {row}")
        rows.append((number, row[0], row[1] if len(row) == 2 and row[1] else None))
    if rows[0][1].lower() in LIST_HEADER_NAMES:
        rows = rows[1:]
    labelled = [label is not None for _, _, label in rows]
    if any(labelled) and not all(labelled):
        number = rows[labelled.index(not labelled[0])][0]
        raise SourceError(
            f"{list_path}:{number}: some lines have a label and some do not; give every line a label or none"
        )
    folder = list_path.parent
    candidates, stats = [], []
    for _, path, label in rows:
        full_path = folder / path  # an absolute path in the list stays absolute
        try:
            info = full_path.stat()
            size = info.st_size if stat.S_ISREG(info.st_mode) else None
            stats.append(f"{path}\t{label}\t{info.st_size}\t{info.st_mtime_ns}")
        except OSError:
            size = None
            stats.append(f"{path}\t{label}\tmissing")
        candidates.append(Candidate(path, label, size, str(full_path)))
    if all(c.size is None for c in candidates):
        raise SourceError(
            f"none of the files listed in {list_path} exists (the first is {folder / rows[0][1]}); "
            "paths are read relative to the list file's folder"
        )
    classes = sorted_classes(c.class_name for c in candidates)
    if classes and all(re.fullmatch(r"\d+", name) for name in classes):
        # Integer labels are kept as given: class "7" gets label 7, not its rank among the names.
        classes = [str(label) for label in range(max(map(int, classes)) + 1)]
        candidates = [c._replace(class_name=str(int(c.class_name))) for c in candidates]
    candidates.sort()
    fingerprint = digest([hashlib.sha256(text.encode()).hexdigest(), *stats])
    return Source("list", list_path, candidates, classes, fingerprint)


def digest(lines):
    hasher = hashlib.sha256()
    for line in lines:
        hasher.update(line.encode("utf-8", "surrogateescape") + b"\n")
    return hasher.hexdigest()
