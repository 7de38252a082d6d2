"""Read access to the layers: scandir, lstat and overlay xattrs, never following symlinks.

This module only reads. Writes go through `repair.Journal`, which the engine hands to
nobody under `-n`, so a `-n` run cannot change anything by construction.
"""
from __future__ import annotations

import enum
import errno
import os
import stat
from dataclasses import dataclass
from typing import Iterator, Optional

import xattr as _xattr

from ovlfsck.errors import OperationalError


class Kind(enum.Enum):
    DIR = "d"
    REG = "f"
    LNK = "l"
    CHR = "c"
    BLK = "b"
    FIFO = "p"
    SOCK = "s"
    GONE = "-"  # vanished between readdir and stat


_MODE_KIND = {
    stat.S_IFDIR: Kind.DIR,
    stat.S_IFREG: Kind.REG,
    stat.S_IFLNK: Kind.LNK,
    stat.S_IFCHR: Kind.CHR,
    stat.S_IFBLK: Kind.BLK,
    stat.S_IFIFO: Kind.FIFO,
    stat.S_IFSOCK: Kind.SOCK,
}


def kind_of_mode(mode: int) -> Kind:
    return _MODE_KIND.get(stat.S_IFMT(mode), Kind.GONE)


class Xattrs:
    """Reads the private overlay xattrs of one namespace (`trusted` or `user`).

    Escaped names (`<ns>.overlay.overlay.*`, written for nested overlays) belong to the
    overlay above, not to us, and are never returned (overlay-format.md §2.2).
    """

    def __init__(self, namespace: str) -> None:
        self.namespace = namespace
        self.prefix = f"{namespace}.overlay."
        self._escaped = self.prefix + "overlay."
        self._prefix_b = self.prefix.encode()

    def name(self, suffix: str) -> str:
        return self.prefix + suffix

    def read_all(self, path: str) -> dict[str, bytes]:
        """All private overlay xattrs of `path` as {suffix: value}; {} if none or unsupported."""
        try:
            names = _xattr.list(path, nofollow=True)
        except OSError as exc:
            return self._handle(exc, path, {})
        out: dict[str, bytes] = {}
        for raw in names:
            name = raw.decode("utf-8", "surrogateescape") if isinstance(raw, bytes) else raw
            if not name.startswith(self.prefix) or name.startswith(self._escaped):
                continue
            try:
                out[name[len(self.prefix) :]] = _xattr.get(path, name, nofollow=True)
            except OSError as exc:
                self._handle(exc, path, None)
        return out

    def get(self, path: str, suffix: str) -> Optional[bytes]:
        try:
            return _xattr.get(path, self.prefix + suffix, nofollow=True)
        except OSError as exc:
            return self._handle(exc, path, None)

    def _handle(self, exc: OSError, path: str, default):
        if exc.errno in (errno.ENODATA, errno.ENOTSUP, errno.ENOENT, errno.ENOTDIR):
            return default
        if exc.errno in (errno.EACCES, errno.EPERM) and self.namespace == "trusted":
            raise OperationalError(
                f"{path}: cannot read trusted.overlay.* xattrs: run as root or use userxattr"
            ) from exc
        if exc.errno in (errno.EPERM,):
            # user.* xattrs are not allowed on symlinks and special files: none there.
            return default
        raise OperationalError(f"{path}: cannot read xattrs: {exc.strerror}") from exc


@dataclass
class Entry:
    """One directory entry of one layer, with lazily read stat and xattrs."""

    name: str
    path: str  # absolute path on the host
    kind: Optional[Kind]  # None until known (d_type said "other")
    _stat: Optional[os.stat_result] = None
    _xattrs: Optional[dict[str, bytes]] = None

    def lstat(self) -> os.stat_result:
        if self._stat is None:
            self._stat = os.lstat(self.path)
        return self._stat

    def get_kind(self) -> Kind:
        if self.kind is None:
            try:
                self.kind = kind_of_mode(self.lstat().st_mode)
            except FileNotFoundError:
                self.kind = Kind.GONE
        return self.kind

    @property
    def is_dir(self) -> bool:
        return self.get_kind() is Kind.DIR

    def xattrs(self, xa: Xattrs) -> dict[str, bytes]:
        if self._xattrs is None:
            self._xattrs = xa.read_all(self.path)
        return self._xattrs

    def is_chr_whiteout(self) -> bool:
        """A 0/0 character device of any mode (IS_WHITEOUT in the kernel)."""
        if self.get_kind() is not Kind.CHR:
            return False
        try:
            return self.lstat().st_rdev == 0
        except (FileNotFoundError, NotADirectoryError):
            return False

    def is_xwhiteout(self, xa: Xattrs) -> bool:
        """A zero-size regular file carrying the `whiteout` xattr (kernel >= 6.7)."""
        if self.get_kind() is not Kind.REG:
            return False
        if "whiteout" not in self.xattrs(xa):
            return False
        try:
            return self.lstat().st_size == 0
        except (FileNotFoundError, NotADirectoryError):
            return False  # vanished since readdir: nothing to check

    def is_whiteout(self, xa: Xattrs) -> bool:
        return self.is_chr_whiteout() or self.is_xwhiteout(xa)


def scan(path: str) -> Iterator[Entry]:
    """One scandir of a layer directory; d_type gives dir/file/symlink without a stat."""
    with os.scandir(path) as it:
        for de in it:
            if de.is_dir(follow_symlinks=False):
                kind: Optional[Kind] = Kind.DIR
            elif de.is_symlink():
                kind = Kind.LNK
            elif de.is_file(follow_symlinks=False):
                kind = Kind.REG
            else:
                kind = None
            yield Entry(de.name, de.path, kind)


def lstat_entry(path: str) -> Optional[Entry]:
    """An Entry for `path` (no symlink followed), or None if nothing is there."""
    try:
        st = os.lstat(path)
    except (FileNotFoundError, NotADirectoryError):
        return None
    return Entry(os.path.basename(path), path, kind_of_mode(st.st_mode), st)


def quoted(name: str) -> str:
    """A name for messages: quoted and escaped like paths are."""
    return "'" + display(name) + "'"


def display(path: str) -> str:
    """A printable, unambiguous form of a path (newlines and undecodable bytes escaped)."""
    raw = os.fsencode(path)
    text = raw.decode("utf-8", "backslashreplace")
    if any(ch in text for ch in "\n\r\t\x1b") or any(ord(c) < 32 or ord(c) == 127 for c in text):
        text = "".join(
            c if 32 <= ord(c) != 127 else f"\\x{ord(c):02x}" for c in text
        )
    return text
