"""Read access to the layers: scandir, lstat and overlay xattrs, never following symlinks.

This module only reads. Writes go through `repair.Journal`, which the engine hands to
nobody under `-n`, so a `-n` run cannot change anything by construction.

Cost model (docs/performance.md): one `scandir` per directory gives every entry's type
(d_type) and inode number (d_ino) without a syscall per entry; `lstat` is made only where
d_type cannot tell (character devices: a whiteout is 0/0; other special files; filesystems
without d_type) or where a caller asks for more than d_type and d_ino say; xattrs are read
on first use, once per entry, unless the prefetch process (`Prefetcher`, `check -n` of a
large layer set) already read them on the other core.
"""
from __future__ import annotations

import array
import enum
import errno
import fcntl
import marshal
import os
import re
import select
import stat
import struct
import sys
from collections import abc
from types import MappingProxyType
from typing import Callable, Iterator, Mapping, Optional

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

# Module-level names: `Kind.DIR` is an attribute lookup on the enum class at every use.
_DIR = Kind.DIR
_REG = Kind.REG
_LNK = Kind.LNK
_CHR = Kind.CHR
_GONE = Kind.GONE


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
        self._escaped_b = self._escaped.encode()
        self._suffixes: dict[str, str] = {}
        # Called with the path before a read (the engine lands queued writes of that path).
        self.before_read: Optional[Callable[[str], None]] = None

    def name(self, suffix: str) -> str:
        return self.prefix + suffix

    def read_all(self, path: str) -> dict[str, bytes]:
        """All private overlay xattrs of `path` as {suffix: value}; {} if none or unsupported."""
        if self.before_read is not None:
            self.before_read(path)
        try:
            names = _xattr.list(path, nofollow=True)
        except OSError as exc:
            return self._handle(exc, path, {})
        out: dict[str, bytes] = {}
        if not names:
            return out
        prefix_b = self._prefix_b
        for raw in names:
            if isinstance(raw, bytes):
                if not raw.startswith(prefix_b) or raw.startswith(self._escaped_b):
                    continue
                name = raw.decode("utf-8", "surrogateescape")
            else:
                name = raw
                if not name.startswith(self.prefix) or name.startswith(self._escaped):
                    continue
            try:
                # The raw name: pyxattr encodes a str name strictly (UTF-8), so a name that
                # is not UTF-8 would raise instead of being read.
                value = _xattr.get(path, raw, nofollow=True)
            except OSError as exc:
                self._handle(exc, path, None)
                continue
            suffix = self._suffixes.get(name)
            if suffix is None:
                # One str object per suffix, not one per entry (memory of pending entries).
                suffix = self._suffixes[name] = sys.intern(name[len(self.prefix):])
            out[suffix] = value
        return out

    def get(self, path: str, suffix: str) -> Optional[bytes]:
        if self.before_read is not None:
            self.before_read(path)
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


# The xattrs of an entry known to have no overlay xattrs (shared, read-only).
NO_XATTRS: Mapping[str, bytes] = MappingProxyType({})

_tlen = tuple.__len__
_tget = tuple.__getitem__
_KEYS = slice(0, None, 2)
_VALUES = slice(1, None, 2)


class PackedXattrs(tuple):
    """A small read-only {name: value} map kept as one flat tuple (name0, value0, name1,
    value1, ...): 56 bytes and 16 per xattr instead of a dict's ~200. The prefetched
    entries' xattrs are kept so: a wide directory's pending subdirectories all keep theirs
    until they are visited (at 1M entries, 14k directories carrying an origin at the root).
    Reads like a dict (get, [], in, len, iteration, keys/values/items, ==); dict(x) copies."""

    __slots__ = ()

    @classmethod
    def of(cls, d: Mapping[str, bytes]) -> "PackedXattrs":
        flat: list = []
        for k, v in d.items():
            flat.append(k)
            flat.append(v)
        return cls(flat)

    def get(self, key, default=None):
        if _tlen(self) == 2:
            return _tget(self, 1) if _tget(self, 0) == key else default
        keys = _tget(self, _KEYS)
        if key in keys:
            return _tget(self, 2 * keys.index(key) + 1)
        return default

    def __getitem__(self, key):
        value = self.get(key, _MISSING)
        if value is _MISSING:
            raise KeyError(key)
        return value

    def __contains__(self, key) -> bool:
        return key in _tget(self, _KEYS)

    def __len__(self) -> int:
        return _tlen(self) >> 1

    def __iter__(self):
        return iter(_tget(self, _KEYS))

    def keys(self):
        return _tget(self, _KEYS)

    def values(self):
        return _tget(self, _VALUES)

    def items(self):
        return list(zip(_tget(self, _KEYS), _tget(self, _VALUES)))

    def copy(self) -> dict:
        return dict(self.items())

    def __eq__(self, other: object) -> bool:
        if isinstance(other, abc.Mapping):
            return dict(self.items()) == dict(other.items())
        return NotImplemented

    def __ne__(self, other: object) -> bool:
        eq = self.__eq__(other)
        return eq if eq is NotImplemented else not eq

    __hash__ = None  # type: ignore[assignment]

    def __repr__(self) -> str:
        return repr(dict(self.items()))

    def __reduce__(self):
        return (dict, (self.items(),))


_MISSING = object()
abc.Mapping.register(PackedXattrs)


class Listing(dict):
    """A layer directory's entries, {name: Entry} in byte order of the names.

    `special`: when known (a listing from the prefetch child), the names (in byte order)
    of the entries that are not plain: anything but a regular file, directory or symlink,
    or an entry with overlay xattrs (or whose xattrs are not known yet). Passes that look
    only at such entries (whiteouts, stray xattrs) iterate `special_items()`; None: every
    entry may be special. `dirs`, when known: the names of the d_type directories."""

    __slots__ = ("special", "dirs", "inos", "special_items")

    def __init__(self, *args) -> None:
        dict.__init__(self, *args)
        self.special: Optional[list[str]] = None
        self.special_items: Optional[list[tuple[str, Entry]]] = None  # see special_items()
        self.dirs: Optional[list[str]] = None  # when known: the names of the directories
        # When known and standing in for st_ino (DevInfo.trusted, no mount point among the
        # entries): the d_ino of each entry in order (0 for directories; an array).
        self.inos: Optional[array.array] = None


_UNSET = object()


class LazyListing(Listing):
    """A Listing from a prefetch record whose plain entries (no xattrs, type from d_type)
    are made on first use: most are never looked at. Until then the dict holds the entry's
    index in the record; every read (`[]`, get, items, values, iteration of the whole, ==)
    gives Entries."""

    __slots__ = ("_src",)

    def __init__(self, *args, src: Optional[tuple] = None) -> None:
        Listing.__init__(self, *args)
        self._src = src  # (kinds, inos, dev, prefix) while any is unmade

    def _make(self, name: str, i: int) -> Entry:
        kinds, inos, dev, prefix = self._src  # type: ignore[misc]
        entry = _record_entry(name, kinds[i], inos[i], dev, prefix)
        dict.__setitem__(self, name, entry)
        return entry

    def _make_all(self) -> None:
        if self._src is not None:
            make = self._make
            for name, v in list(dict.items(self)):
                if type(v) is int:
                    make(name, v)
            self._src = None

    def __getitem__(self, name: str) -> Entry:
        v = dict.__getitem__(self, name)
        if type(v) is int:
            return self._make(name, v)
        return v

    def get(self, name, default=None):
        v = dict.get(self, name, _UNSET)
        if v is _UNSET:
            return default
        if type(v) is int:
            return self._make(name, v)
        return v

    def __iter__(self):
        # Not dict's own: dict(listing) and {**listing} then go through keys() and [].
        return dict.__iter__(self)

    def items(self):
        self._make_all()
        return dict.items(self)

    def values(self):
        self._make_all()
        return dict.values(self)

    def __eq__(self, other: object) -> bool:
        self._make_all()
        if isinstance(other, LazyListing):
            other._make_all()
        return dict.__eq__(self, other)

    def __ne__(self, other: object) -> bool:
        eq = self.__eq__(other)
        return eq if eq is NotImplemented else not eq

    __hash__ = None  # type: ignore[assignment]

    def copy(self) -> "Listing":
        self._make_all()
        out = Listing(dict.items(self))
        out.special, out.dirs, out.inos = self.special, self.dirs, self.inos
        return out

    def pop(self, name, *default):
        if name in self:
            entry = self[name]
            dict.pop(self, name)
            return entry
        return dict.pop(self, name, *default)

    def popitem(self):
        self._make_all()
        return dict.popitem(self)

    def setdefault(self, name, default=None):
        if name in self:
            return self[name]
        return dict.setdefault(self, name, default)

    def __repr__(self) -> str:
        self._make_all()
        return dict.__repr__(self)


def special_items(listing: dict[str, Entry]):
    """The (name, entry) pairs of `listing` that may be special (see Listing), in order."""
    special = getattr(listing, "special", None)
    if special is None:
        return listing.items()
    items = listing.special_items
    if items is None:
        if len(special) > SPECIAL_ITEMS_KEPT:
            # A wide directory's: made again for each pass rather than kept beside the
            # entries while the directory is visited (memory, not time, is what it costs).
            return ((name, listing[name]) for name in special)
        items = listing.special_items = [(name, listing[name]) for name in special]  # several passes ask
    return items


# Listings with more special entries than this do not keep their special_items list.
SPECIAL_ITEMS_KEPT = 2048


def maybe_special(listing: dict[str, Entry]) -> Optional[list[str]]:
    """The names of `listing` that may not be plain files or symlinks, in byte order, when
    the listing knows them (a Listing from the prefetch child: its `special` and `dirs`);
    None: any name may be."""
    special = getattr(listing, "special", None)
    dirs = getattr(listing, "dirs", None)
    if special is None or dirs is None:
        return None
    if not dirs or len(special) == len(listing):
        return special
    if not special or len(dirs) == len(listing):
        return dirs
    return sort_names(set(special).union(dirs))


class ReaddirStat:
    """What `Entry.lstat()` gives for a non-directory read from a directory whose
    filesystem keeps d_ino == st_ino (ext4, xfs, tmpfs, ...; see `DevInfo`): `st_ino` (d_ino)
    and `st_dev` (the directory's) without a syscall; any other field makes the real
    `lstat` on first use (Entry.real_lstat, cached in the entry, which then gives it from
    lstat(); its OSError, e.g. FileNotFoundError, is raised then)."""

    __slots__ = ("st_ino", "st_dev", "_entry")

    def __init__(self, ino: int, dev: int, entry: "Entry") -> None:
        self.st_ino = ino
        self.st_dev = dev
        self._entry = entry

    def __getattr__(self, name: str):
        if name.startswith("__") or name == "_entry":
            raise AttributeError(name)
        return getattr(self._entry.real_lstat(), name)

    @property
    def _real(self) -> Optional[os.stat_result]:
        """The real stat, if it was read (for tests and debugging)."""
        return self._entry._stat

    def __repr__(self) -> str:  # pragma: no cover - debugging aid
        return f"ReaddirStat(st_ino={self.st_ino}, st_dev={self.st_dev}, path={self._entry.path!r})"


class CompactStat:
    """The fields of an os.stat_result that the checks compare (type and mode, identity,
    links, owner, size, device number), for results kept until the end of a run: a
    stat_result holds ~20 objects (times as floats and ints), this one only what is read."""

    __slots__ = ("st_mode", "st_ino", "st_dev", "st_nlink", "st_uid", "st_gid", "st_size",
                 "st_rdev")

    def __init__(self, st: os.stat_result) -> None:
        self.st_mode = st.st_mode
        self.st_ino = st.st_ino
        self.st_dev = st.st_dev
        self.st_nlink = st.st_nlink
        self.st_uid = st.st_uid
        self.st_gid = st.st_gid
        self.st_size = st.st_size
        self.st_rdev = st.st_rdev

    def __repr__(self) -> str:  # pragma: no cover - debugging aid
        return f"CompactStat(mode={self.st_mode:o}, ino={self.st_ino}, dev={self.st_dev})"


class DirPrefix(str):
    """A directory's path with a trailing slash, shared by the Entries of its listing (each
    makes its own path only when asked: most never are)."""

    __slots__ = ()


class Entry:
    """One directory entry of one layer, with lazily read stat and xattrs.

    `kind` is None only until known (an entry made without a type); `ino` is d_ino when the
    entry is a non-directory from a scandir; `dev` is its directory's st_dev when that
    filesystem's d_ino can stand in for st_ino (then `lstat()` needs no syscall for
    st_ino/st_dev; directories always get a real lstat: a mount point's differ). `path` is
    the host path; entries of a listing keep only their directory's (shared) prefix and
    make it on use.
    """

    __slots__ = ("name", "_path", "kind", "_stat", "_xattrs", "ino", "dev")

    def __init__(self, name: str, path: Optional[str], kind: Optional[Kind],
                 _stat: Optional[os.stat_result] = None,
                 _xattrs: Optional[dict[str, bytes]] = None,
                 ino: Optional[int] = None, dev: Optional[int] = None,
                 _dir: Optional["DirPrefix"] = None) -> None:
        self.name = name
        # The host path, or (an entry of a listing) its directory's shared DirPrefix.
        self._path = path if _dir is None else _dir
        self.kind = kind
        self._stat = _stat
        self._xattrs = _xattrs
        self.ino = ino
        self.dev = dev

    @property
    def path(self) -> str:
        path = self._path
        if type(path) is DirPrefix:
            return path + self.name
        return path

    def __repr__(self) -> str:
        kind = self.kind.name if self.kind is not None else None
        return f"Entry(name={self.name!r}, path={self.path!r}, kind={kind})"

    def lstat(self) -> os.stat_result:
        st = self._stat
        if st is None:
            if self.dev is not None and self.ino is not None and self.kind is not _DIR:
                # Not kept in the entry (no reference cycle): cheap to make again.
                return ReaddirStat(self.ino, self.dev, self)
            st = self._stat = os.lstat(self.path)
        return st

    def real_lstat(self) -> os.stat_result:
        """A real lstat (every field), cached."""
        st = self._stat
        if st is None:
            st = self._stat = os.lstat(self.path)
        return st

    def get_kind(self) -> Kind:
        kind = self.kind
        if kind is None:
            try:
                kind = kind_of_mode(self.real_lstat().st_mode)
            except (FileNotFoundError, NotADirectoryError):
                kind = _GONE
            self.kind = kind
        return kind

    @property
    def is_dir(self) -> bool:
        kind = self.kind
        if kind is None:
            kind = self.get_kind()
        return kind is _DIR

    def xattrs(self, xa: Xattrs) -> dict[str, bytes]:
        x = self._xattrs
        if x is None:
            x = self._xattrs = xa.read_all(self.path)
        return x

    def is_chr_whiteout(self) -> bool:
        """A 0/0 character device of any mode (IS_WHITEOUT in the kernel)."""
        kind = self.kind
        if kind is None:
            kind = self.get_kind()
        if kind is not _CHR:
            return False
        try:
            return self.real_lstat().st_rdev == 0
        except (FileNotFoundError, NotADirectoryError):
            return False

    def is_xwhiteout(self, xa: Xattrs) -> bool:
        """A zero-size regular file carrying the `whiteout` xattr (kernel >= 6.7)."""
        kind = self.kind
        if kind is None:
            kind = self.get_kind()
        if kind is not _REG:
            return False
        x = self._xattrs
        if x is None:
            x = self.xattrs(xa)
        if "whiteout" not in x:
            return False
        try:
            return self.real_lstat().st_size == 0
        except (FileNotFoundError, NotADirectoryError):
            return False  # vanished since readdir: nothing to check

    def is_whiteout(self, xa: Xattrs) -> bool:
        kind = self.kind
        if kind is _DIR or kind is _LNK:
            return False
        if kind is _REG:
            x = self._xattrs
            if x is not None and not x:
                return False
            return self.is_xwhiteout(xa)
        return self.is_chr_whiteout() or self.is_xwhiteout(xa)


# --------------------------------------------------------------------------- listing


def _kind_of(de: os.DirEntry) -> tuple[Optional[Kind], Optional[os.stat_result]]:
    """d_type gives dir/file/symlink without a stat; anything else (a whiteout is a
    character device, and some filesystems give no d_type) is lstat'ed now."""
    try:
        if de.is_file(follow_symlinks=False):
            return _REG, None
        if de.is_dir(follow_symlinks=False):
            return _DIR, None
        if de.is_symlink():
            return _LNK, None
    except OSError:
        pass
    try:
        st = de.stat(follow_symlinks=False)
    except (FileNotFoundError, NotADirectoryError):
        return _GONE, None
    except OSError:
        return None, None
    return kind_of_mode(st.st_mode), st


def scan(path: str, dev: Optional[int] = None, mountpoints: Optional[frozenset] = None) -> Iterator[Entry]:
    """One scandir of a layer directory, in directory order.

    `dev`: the directory's st_dev, given only when its filesystem keeps d_ino == st_ino
    (DevInfo.trusted); then non-directories answer st_ino/st_dev without a syscall, except
    those in `mountpoints` (a bind-mounted file: lstat crosses the mount)."""
    prefix = DirPrefix(path if path.endswith("/") else path + "/")
    with os.scandir(path) as it:
        for de in it:
            name = de.name
            if de.is_file(follow_symlinks=False):
                kind: Optional[Kind] = _REG
                st = None
            elif de.is_dir(follow_symlinks=False):
                kind, st = _DIR, None
            elif de.is_symlink():
                kind, st = _LNK, None
            else:
                kind, st = _kind_of(de)
            edev = dev
            if mountpoints and prefix + name in mountpoints:
                edev = None
            yield Entry(name, None, kind, st, None, de.inode() if kind is not _DIR else None, edev,
                        prefix)


def _fskey(name: str) -> bytes:
    return name.encode("utf-8", "surrogateescape")


def sort_names(names) -> list[str]:
    """Names in byte order (the order of their file-system encoding)."""
    names = list(names)
    # For text without surrogate escapes, code point order is UTF-8 byte order.
    if all(map(str.isascii, names)):
        names.sort()
    else:
        names.sort(key=_fskey)
    return names


def scan_sorted(path: str, dev: Optional[int] = None,
                mountpoints: Optional[frozenset] = None) -> "Listing":
    """`scan`, as {name: Entry} in byte order of the names."""
    entries = {e.name: e for e in scan(path, dev, mountpoints)}
    names = list(entries)
    if all(map(str.isascii, names)):
        names.sort()
    else:
        names.sort(key=_fskey)
    return Listing({n: entries[n] for n in names})


def walk_tree(root: str) -> Iterator[tuple[str, os.DirEntry]]:
    """(root-relative path, DirEntry) of everything below `root`, depth first; symlinks are
    never followed, unreadable directories are skipped. The caller may stop at any time."""
    stack = [("", root)]
    while stack:
        rel, path = stack.pop()
        try:
            it = os.scandir(path)
        except OSError:
            continue
        with it:
            for de in it:
                sub = f"{rel}/{de.name}" if rel else de.name
                try:
                    if de.is_dir(follow_symlinks=False):
                        stack.append((sub, de.path))
                except OSError:
                    pass
                yield sub, de


_CMP_FLAGS = os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC


def _open_noatime(path: str) -> int:
    try:
        return os.open(path, _CMP_FLAGS | getattr(os, "O_NOATIME", 0))
    except PermissionError:  # O_NOATIME needs ownership (or CAP_FOWNER)
        return os.open(path, _CMP_FLAGS)


def same_data(a: str, sa: os.stat_result, b: str, sb: os.stat_result) -> bool:
    """Whether two objects hold the same data: the same file type and a regular file's
    bytes, a symlink's target, a device's number (fifos and sockets hold none). Never
    follows a symlink; an object that cannot be read is not the same."""
    if stat.S_IFMT(sa.st_mode) != stat.S_IFMT(sb.st_mode):
        return False
    if stat.S_ISLNK(sa.st_mode):
        try:
            return os.readlink(a) == os.readlink(b)
        except OSError:
            return False
    if stat.S_ISCHR(sa.st_mode) or stat.S_ISBLK(sa.st_mode):
        return sa.st_rdev == sb.st_rdev
    if not stat.S_ISREG(sa.st_mode):
        return True
    if sa.st_size != sb.st_size:
        return False
    try:
        fa = _open_noatime(a)
    except OSError:
        return False
    try:
        fb = _open_noatime(b)
        try:
            while True:
                x, y = os.read(fa, 1 << 20), os.read(fb, 1 << 20)
                if x != y:
                    return False
                if not x:
                    return True
        finally:
            os.close(fb)
    except OSError:
        return False
    finally:
        os.close(fa)


def lstat_entry(path: str) -> Optional[Entry]:
    """An Entry for `path` (no symlink followed), or None if nothing is there."""
    try:
        st = os.lstat(path)
    except (FileNotFoundError, NotADirectoryError):
        return None
    return Entry(os.path.basename(path), path, kind_of_mode(st.st_mode), st)


# --------------------------------------------------------------------------- devices


# Filesystems whose readdir d_ino is the inode's st_ino for every entry (no inode number
# translation, no per-subvolume devices): statfs magic names as in /proc/self/mountinfo.
DINO_FILESYSTEMS = frozenset({"ext2", "ext3", "ext4", "xfs", "tmpfs", "f2fs", "jfs"})


def _unescape_mount(field: str) -> str:
    if "\\" not in field:
        return field
    out = bytearray()
    raw = field.encode("utf-8", "surrogateescape")
    i = 0
    while i < len(raw):
        if raw[i] == 0x5C and i + 4 <= len(raw) and raw[i + 1:i + 4].isdigit():
            out.append(int(raw[i + 1:i + 4], 8))
            i += 4
        else:
            out.append(raw[i])
            i += 1
    return bytes(out).decode("utf-8", "surrogateescape")


class DevInfo:
    """Which devices' d_ino can stand in for st_ino, and the mount points inside the layers,
    from /proc/self/mountinfo (nothing is trusted if it cannot be read)."""

    def __init__(self, roots: list[str], mountinfo: str = "/proc/self/mountinfo") -> None:
        self.trusted: set[int] = set()
        inside: set[str] = set()
        try:
            with open(mountinfo, encoding="utf-8", errors="surrogateescape") as fh:
                lines = fh.read().split("\n")
        except OSError:
            lines = []
        prefixes = [r.rstrip("/") + "/" for r in roots]
        for line in lines:
            pre, sep, post = line.partition(" - ")
            fields = pre.split()
            if not sep or len(fields) < 5:
                continue
            fstype = post.split(" ", 1)[0]
            try:
                major, minor = (int(x) for x in fields[2].split(":"))
            except ValueError:
                continue
            point = _unescape_mount(fields[4])
            if fstype in DINO_FILESYSTEMS:
                self.trusted.add(os.makedev(major, minor))
            if any(point.startswith(p) for p in prefixes):
                inside.add(point)
        self.mountpoints: frozenset = frozenset(inside)

    def dir_dev(self, entry: Entry, parent_dev: Optional[int]) -> Optional[int]:
        """The trusted st_dev of directory `entry` (None: not trusted / not known)."""
        st = entry._stat
        if st is not None:
            dev = st.st_dev
        elif self.mountpoints and entry.path in self.mountpoints:
            try:
                dev = os.lstat(entry.path).st_dev
            except OSError:
                return None
        else:
            dev = parent_dev
        return dev if dev in self.trusted else None


# --------------------------------------------------------------------------- prefetch

# The prefetch child: a separate interpreter (`python -I -S -c`, no ovlfsck import) that
# walks every namespace layer ahead of the walker, in the walker's own order (pre-order,
# names in byte order, the layers of one relative path one after another), and sends one
# record per directory: its names in byte order, d_type, d_ino, and the overlay xattrs of
# every entry (listxattr + getxattr), so that the walker makes none of those syscalls and
# the I/O of a cold cache overlaps the checks on the second core. It only reads; it never
# follows a symlink (a directory is listed only in the layers whose parent listing showed it
# as a d_type directory); on any error it leaves the
# entry (or the directory) to the walker, which reads it itself and reports what it must.
_CHILD = r"""
import array, gc, marshal, operator, os, struct, sys
# Nothing here makes reference cycles (what a directory's listing makes is freed by its
# reference counts): the cyclic collector, run every 700 allocations by default, only
# costs time (~6% of this process's). Rarely, rather than never: a safety net.
gc.set_threshold(1 << 17, 100, 100)
def main():
    prefix = sys.argv[1]
    esc = prefix + "overlay."
    plen = len(prefix)
    # Names as text when this interpreter decodes them as the parent does (the parent's
    # file-system encoding and error handler in argv[2]): the decoding is done here, on the
    # core that has time for it. Otherwise bytes, which the parent decodes itself.
    if sys.argv[2] == sys.getfilesystemencoding() + ":" + sys.getfilesystemencodeerrors():
        roots = sys.argv[4:]
        slash, empty = "/", ""
    else:
        roots = [os.fsencode(r) for r in sys.argv[4:]]
        slash, empty = b"/", b""
    # argv[3] "all": every layer from its root, in the walk's pre-order. "starts": the
    # directories on stdin ([(layer index, relpath)], marshal), one after another in that
    # order, each in pre-order with the layers beneath its own; a record's head then also
    # says which start it is of.
    if sys.argv[3] == "starts":
        starts = marshal.loads(sys.stdin.buffer.read())
        plan = [(k, rel if slash == "/" else os.fsencode(rel), range(li, len(roots)))
                for k, (li, rel) in enumerate(starts)]
    else:
        plan = [(None, empty, range(len(roots)))]
    listx, getx, write, fsencode = os.listxattr, os.getxattr, os.write, os.fsencode
    # xattr names as the parent's Xattrs.read_all makes them (UTF-8, surrogateescape):
    # interned text when this interpreter decodes them so (marshal keeps them interned and
    # sends each once per record: the parent keeps the dicts as they arrive); else bytes.
    if sys.getfilesystemencoding() == "utf-8" and sys.getfilesystemencodeerrors() == "surrogateescape":
        xkey = sys.intern
    else:
        xkey = fsencode
    # Short values ("y", "x", nlink's) as one object each: marshal sends a repeat as a
    # reference, and the parent keeps one object for all the entries that have it.
    small = {}
    def share(v):
        return small.setdefault(v, v) if len(v) < 8 else v
    def order(names):
        # byte order of the names (code point order is that for text without escapes)
        names = list(names)
        if slash == "/" and not all(map(str.isascii, names)):
            names.sort(key=fsencode)
        else:
            names.sort()
        return names
    pack = struct.Struct("<II").pack
    here = "." if slash == "/" else b"."
    roots = [os.path.abspath(r) for r in roots]  # before the first chdir
    getname = operator.attrgetter("name")
    def bytename(de):
        return fsencode(de.name)
    out = []
    size = 0
    def send(parts):
        data = memoryview(b"".join(parts))
        while data:  # a write can be short (a stop and continue of the process group)
            data = data[write(1, data):]
    for sk, start, below in plan:
        # (relpath, the layers in which it is a directory: their parent's listing said so
        # without following a symlink)
        stack = [(start, below)]
        while stack:
            rel, layers = stack.pop()
            subdirs = {}
            for li in layers:
                root = roots[li]
                path = root + slash + rel if rel else root
                # The directory as the working directory: every listxattr below resolves one
                # name, not the whole path again (one chdir per directory).
                try:
                    os.chdir(path)
                    with os.scandir(here) as it:
                        des = list(it)
                except OSError:
                    continue
                des.sort(key=getname)
                names = [de.name for de in des]
                if slash == "/" and not all(map(str.isascii, names)):
                    des.sort(key=bytename)  # byte order
                    names = [de.name for de in des]
                xmap = {}
                unknown = []
                # The type from d_type and d_ino: no syscall here, and nothing fails but for
                # a file system without d_type (then one entry at a time, "?" where it does).
                try:
                    kinds = []
                    for de in des:
                        if de.is_file(follow_symlinks=False):
                            kinds.append("f")
                        elif de.is_dir(follow_symlinks=False):
                            kinds.append("d")
                        elif de.is_symlink():
                            kinds.append("l")
                        else:
                            kinds.append("?")
                    inos = [de.inode() for de in des]
                except OSError:
                    kinds = []
                    inos = []
                    for de in des:
                        try:
                            if de.is_file(follow_symlinks=False):
                                k = "f"
                            elif de.is_dir(follow_symlinks=False):
                                k = "d"
                            elif de.is_symlink():
                                k = "l"
                            else:
                                k = "?"
                            ino = de.inode()
                        except OSError:
                            k, ino = "?", 0
                        kinds.append(k)
                        inos.append(ino)
                kinds = "".join(kinds)
                dirs = []
                i = kinds.find("d")
                while i >= 0:
                    dirs.append(i)
                    inos[i] = 0  # (a directory's d_ino is not sent: a mount point's differs)
                    subdirs.setdefault(names[i], []).append(li)
                    i = kinds.find("d", i + 1)
                try:
                    xls = [listx(p, follow_symlinks=False) for p in names]
                except OSError:
                    xls = []
                    for i, p in enumerate(names):
                        try:
                            xls.append(listx(p, follow_symlinks=False))
                        except OSError:
                            unknown.append(i)
                            xls.append(None)
                if any(xls):  # (in a lower layer most directories have no xattrs at all)
                    for i, xs in enumerate(xls):
                        if xs:
                            ours = [n for n in xs if n.startswith(prefix) and not n.startswith(esc)]
                            if ours:
                                p = names[i]
                                try:
                                    xmap[i] = {xkey(n[plen:]): share(getx(p, n, follow_symlinks=False))
                                               for n in ours}
                                except OSError:
                                    unknown.append(i)
                head = marshal.dumps((li, rel) if sk is None else (li, rel, sk))
                # d_ino as one bytes object (0: a directory, or not known), not an int each
                body = marshal.dumps((names, kinds, array.array("Q", inos).tobytes(),
                                      xmap, unknown, dirs))
                out.append(pack(len(head), len(body)))
                out.append(head)
                out.append(body)
                size += len(head) + len(body) + 8
                if size >= 32768:
                    send(out)
                    out.clear()
                    size = 0
            if rel.count(slash) >= 2047:
                continue
            base = rel + slash if rel else empty
            stack.extend((base + n, subdirs[n]) for n in reversed(order(subdirs)))
    if out:
        send(out)
try:
    main()
except (BrokenPipeError, KeyboardInterrupt):
    pass
"""

_KIND_CODES = {"f": _REG, "d": _DIR, "l": _LNK}
_LEN = struct.Struct("<II")


def _order_key(relpath: str) -> tuple[bytes, ...]:
    """The prefetch child's (and the walker's) pre-order position of a relative path."""
    if not relpath:
        return ()
    return tuple(relpath.encode("utf-8", "surrogateescape").split(b"/"))


class Prefetcher:
    """The walker's side of the prefetch child (see _CHILD).

    `listing()` gives a directory's entries with their xattrs already known, or None when
    the child has no record of it (not reached yet, skipped, or an error there): the walker
    then lists it itself. Records are kept in a bounded buffer (the oldest dropped first),
    so memory does not grow with the layers; the child is throttled by the pipe.

    Started with `starts` (a list of (layer, relpath)), the child reads those directories
    one after the other, each with the layers beneath its own (the hidden walk's sub-stacks,
    in the order the walk takes them) instead of the whole layers; the walker says which
    start it is at (`start_no`, an index into `starts`), so that waiting stays bounded.
    """

    # The child decodes the names when it can decode them as this process does (False:
    # it always sends bytes; for tests of that path).
    TEXT_NAMES = True
    MAX_BUFFERED = 1 << 18  # bytes of records held, not asked for yet (or kept)
    MAX_HEAD = 1 << 16  # a frame's (layer, relpath) and record: larger means a broken stream
    MAX_BODY = 1 << 30

    def __init__(self, proc, layers, by_start: bool = False) -> None:
        self.proc = proc
        self.by_start = by_start  # started with `starts`: positions are (start_no, path, layer)
        self.start_no = 0
        self.fd = proc.stdout.fileno()
        # Set by the walk while it lists one merged directory's layer directories: their
        # directory names share one str (see _entries).
        self.names: Optional[dict[str, str]] = None
        os.set_blocking(self.fd, False)
        self.index = {id(layer): i for i, layer in enumerate(layers)}
        self.layers = list(layers)
        self.buf: dict[tuple[int, str], bytes] = {}
        self.buffered = 0
        self.data = bytearray()
        self.last: Optional[tuple[int, str]] = None  # (layer, relpath) of the last record
        self.eof = False
        self.served = 0
        self.missed = 0
        self.corrupt = False

    @classmethod
    def start(cls, layers, xa: Xattrs,
              starts: Optional[list[tuple[object, str]]] = None) -> Optional["Prefetcher"]:
        import subprocess

        if not sys.executable:
            return None
        plan = None
        if starts is not None:
            index = {id(layer): i for i, layer in enumerate(layers)}
            plan = marshal.dumps([(index[id(layer)], rel) for layer, rel in starts])
        try:
            proc = subprocess.Popen(
                [sys.executable, "-I", "-S", "-X", f"utf8={sys.flags.utf8_mode}", "-c", _CHILD,
                 xa.prefix,
                 f"{_FS_ENCODING}:{sys.getfilesystemencodeerrors()}" if cls.TEXT_NAMES else "-",
                 "all" if plan is None else "starts",
                 *[lay.path for lay in layers]],
                stdin=subprocess.DEVNULL if plan is None else subprocess.PIPE,
                stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, close_fds=True)
        except OSError:
            return None
        if plan is not None:
            # The child reads all of it before it sends anything (no deadlock).
            try:
                with proc.stdin:
                    proc.stdin.write(plan)
            except OSError:
                proc.kill()
                proc.stdout.close()
                proc.wait()
                return None
        try:
            fcntl.fcntl(proc.stdout.fileno(), 1031, 1 << 20)  # F_SETPIPE_SZ
        except OSError:
            pass
        return cls(proc, layers, plan is not None)

    def close(self) -> None:
        proc, self.proc = self.proc, None
        if proc is None:
            return
        self.eof = True
        self.buf.clear()
        try:
            proc.kill()
        except OSError:
            pass
        proc.stdout.close()
        proc.wait()

    # ------------------------------------------------------------------ records

    CHUNK = 1 << 16  # bytes read from the pipe at a time

    def _read(self, block: bool) -> bool:
        """Read one chunk of what the child sent (waiting for it if `block`) and parse the
        complete records in it. False if nothing came (nothing yet, or the end)."""
        if self.eof:
            return False
        if block:
            select.select([self.fd], [], [])
        try:
            chunk = os.read(self.fd, self.CHUNK)
        except BlockingIOError:
            return False
        except OSError:
            chunk = b""
        if not chunk:
            self.eof = True
            return False
        self.data += chunk
        self._parse()
        return True

    def _parse(self) -> None:
        """Complete frames -> the buffer: (layer, relpath) -> the record's marshal bytes,
        decoded only when asked for (bytes are ~4x smaller than the decoded record)."""
        data = self.data
        pos = 0
        end = len(data)
        buf = self.buf
        unpack = _LEN.unpack_from
        view = memoryview(data)
        added = 0
        try:
            while end - pos >= 8:
                nhead, nbody = unpack(data, pos)
                if nhead > self.MAX_HEAD or nbody > self.MAX_BODY:
                    raise ValueError("frame lengths out of range")
                start = pos + 8
                stop = start + nhead + nbody
                if stop > end:
                    break
                head = marshal.loads(view[start:start + nhead])
                # (layer, relpath), and the start's number from a child given starts
                if type(head) is not tuple or len(head) != 2 + self.by_start or any(
                        type(n) is not int for n in head[::2]):
                    raise ValueError("not a record's head")
                li, rel = head[0], head[1]
                if type(rel) is not str:
                    rel = rel.decode(_FS_ENCODING, "surrogateescape")
                # (a directory of two starts' sub-stacks comes once for each)
                key = (li, rel, head[2]) if self.by_start else (li, rel)
                buf[key] = bytes(view[start + nhead:stop])
                self.buffered += nbody
                self.last = key
                added += 1
                pos = stop
        except (ValueError, TypeError, EOFError, AttributeError, IndexError, KeyError):
            self._broken()
            return
        finally:
            view.release()
        if pos:
            self.data = data[pos:]  # a new (small) buffer: a large record's is freed
        # Over the bound: drop the oldest records, never those just read (the walk is
        # about to ask for them).
        while self.buffered > self.MAX_BUFFERED and len(buf) > added:
            old = buf.pop(next(iter(buf)))
            self.buffered -= len(old)

    def _position(self, key: tuple) -> tuple:
        """Where a record (layer, relpath[, start]) comes in the child's order."""
        if self.by_start:
            return (key[2], _order_key(key[1]), key[0])
        return (_order_key(key[1]), key[0])

    def _before(self, want: tuple) -> bool:
        """Has the child not passed `want` (a _position) yet?"""
        last = self.last
        return last is None or self._position(last) < want

    def listing(self, layer, relpath: str, dirpath: str, dev: Optional[int],
                mountpoints: Optional[frozenset], wait: bool = False,
                keep: bool = False) -> Optional[dict[str, Entry]]:
        """The entries of `layer`'s directory `relpath` (at `dirpath`) from the child's
        record, or None. `wait`: the directory is on the child's path ahead (the walk's own
        pre-order): wait for it rather than read it twice. `keep`: leave the record for a
        second visit (hidden sub-stacks are walked from each of their layers)."""
        li = self.index.get(id(layer))
        if li is None or self.proc is None:
            return None
        key = (li, relpath, self.start_no) if self.by_start else (li, relpath)
        buf = self.buf
        rec = buf.get(key)
        if rec is None:
            # Read only as far as needed: the pipe, not this process, holds what the child
            # made ahead of the walk (the buffer keeps records passed over, bounded).
            if wait:
                # The walk's own order: the child gets there (or past it) soon.
                want = self._position(key)
                while rec is None and self._before(want):
                    if not self._read(False) and (self.eof or not self._read(True)):
                        break
                    rec = buf.get(key)
            elif self._read(False):
                rec = buf.get(key)
            if rec is None:
                self.missed += 1
                return None
        if not keep:
            del buf[key]
            self.buffered -= len(rec)
        try:
            out = _entries(marshal.loads(rec), dirpath, dev, mountpoints, self.names)
        except (ValueError, TypeError, EOFError, AttributeError, IndexError, KeyError):
            self._broken()
            self.missed += 1
            return None
        self.served += 1
        return out

    def _broken(self) -> None:
        """The stream from the child is not what it sends (it cannot be trusted from here
        on): stop it; the walk reads every directory itself from now on."""
        self.corrupt = True
        self.close()


_FS_ENCODING = sys.getfilesystemencoding()


def _record_entry(name: str, code: str, ino: int, dev: Optional[int], prefix: "DirPrefix",
                  xattrs: Optional[Mapping[str, bytes]] = NO_XATTRS) -> Entry:
    """The Entry of a record's entry whose type d_type told (`code` f, d or l; d_ino 0: not
    known)."""
    return Entry(name, None, _KIND_CODES[code], None, xattrs, ino or None, dev, prefix)


def _other_kind(name: str, prefix: "DirPrefix", ino: Optional[int], dev: Optional[int]) -> Entry:
    """The Entry of a record's entry whose type d_type did not tell (lstat'ed here)."""
    st = None
    try:
        st = os.lstat(prefix + name)
        kind: Optional[Kind] = kind_of_mode(st.st_mode)
    except (FileNotFoundError, NotADirectoryError):
        kind = _GONE
    except OSError:
        kind = None
    return Entry(name, None, kind, st, NO_XATTRS, ino or None, dev, prefix)


def _entries(rec: tuple, dirpath: str, dev: Optional[int],
             mountpoints: Optional[frozenset], seen: Optional[dict] = None) -> Listing:
    """A child's record -> the Listing `scan` would give (names decoded as os.scandir
    decodes them here; xattr names as Xattrs.read_all decodes them). `seen`: {name: name}
    shared by the listings of one merged directory (Prefetcher.names).

    Called once per layer directory of the walk (~24,000 times on the 200k bench set): the
    common case (no xattrs, no entry of another type) takes the fewest steps."""
    names, kinds, raw_inos, raw_xmap, unknown, dirs = rec
    n = len(names)
    inos = array.array("Q", raw_inos)  # d_ino of each entry, 0 for a directory (or not known)
    if len(inos) != n or len(kinds) != n:
        raise ValueError("record fields of different lengths")
    if n and type(names[0]) is bytes:  # the child could not decode as we do
        enc = _FS_ENCODING
        names = [b.decode(enc, "surrogateescape") for b in names]
    if raw_xmap:
        first = next(iter(raw_xmap.values()))
        if first and type(next(iter(first))) is bytes:
            # the child could not decode xattr names as Xattrs.read_all does: decoded here
            intern = sys.intern
            xmap = {i: PackedXattrs.of({intern(k.decode("utf-8", "surrogateescape")): v
                                        for k, v in x.items()}) for i, x in raw_xmap.items()}
        else:
            pack = PackedXattrs.of
            xmap = {i: pack(x) for i, x in raw_xmap.items()}
    else:
        xmap = raw_xmap
    # One str per directory name for all the layers that have it (their Members wait in
    # the walk's stack: a wide merged directory's would otherwise hold a copy per layer).
    # Not sys.intern: the interpreter's table would grow to the widest directory for good.
    if seen is not None and dirs:
        for i in dirs:
            name = names[i]
            names[i] = seen.setdefault(name, name)
    prefix = DirPrefix(dirpath if dirpath.endswith("/") else dirpath + "/")
    other = "?" in kinds  # an entry whose type d_type did not tell (a whiteout is one)
    if xmap or unknown or other:
        special = set(xmap)
        special.update(unknown)
    else:
        special = None  # no entry is special (most directories)
    if not mountpoints:
        # Entries made on use (LazyListing), but for those of another type (below: a
        # whiteout is a character device), with xattrs or unknown ones: the passes look at
        # few of the others.
        out = LazyListing(zip(names, range(n)), src=(kinds, inos, dev, prefix))
        if other:
            find = kinds.find
            i = find("?")
            while i >= 0:
                special.add(i)
                name = names[i]
                dict.__setitem__(out, name, _other_kind(name, prefix, inos[i], dev))
                i = find("?", i + 1)
    else:
        out = Listing(zip(names, [_record_entry(name, code, ino, dev, prefix) if code != "?"
                                  else _other_kind(name, prefix, ino, dev)
                                  for name, code, ino in zip(names, kinds, inos)]))
        if other:
            special.update(i for i, code in enumerate(kinds) if code == "?")
    if xmap:
        setitem, getitem = dict.__setitem__, dict.__getitem__
        for i, x in xmap.items():
            name = names[i]
            e = getitem(out, name)
            if type(e) is int:  # made here with its xattrs (not through _make: no lookups)
                setitem(out, name, _record_entry(name, kinds[i], inos[i], dev, prefix, x))
            else:
                e._xattrs = x
    for i in unknown:
        out[names[i]]._xattrs = None  # the child could not read them: read here
    stand_in = dev is not None
    if mountpoints:
        for e in out.values():
            if e.path in mountpoints:
                e.dev = None
                stand_in = False
    if stand_in:
        out.inos = inos
    # Every name special, or every one a directory (a wide root's): the names list itself.
    if special is None:
        out.special = []
    elif len(special) == n:
        out.special = names
        if type(out) is LazyListing:
            out._src = None  # every entry was made above
    else:
        out.special = [names[i] for i in sorted(special)]
    out.dirs = names if len(dirs) == n else [names[i] for i in dirs]
    return out


# --------------------------------------------------------------------------- messages


def quoted(name: str) -> str:
    """A name for messages: quoted and escaped like paths are."""
    return "'" + display(name) + "'"


_CONTROL = re.compile("[\x00-\x1f\x7f]")


def display(path: str) -> str:
    """A printable, unambiguous form of a path (newlines and undecodable bytes escaped)."""
    raw = os.fsencode(path)
    text = raw.decode("utf-8", "backslashreplace")
    if _CONTROL.search(text):
        text = "".join(
            c if 32 <= ord(c) != 127 else f"\\x{ord(c):02x}" for c in text
        )
    return text
