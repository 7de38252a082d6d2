"""Pre-flight checks: what must hold before anything inside the layers is read.

In order (each step may refuse with an OperationalError, exit 8):

1. every layer root exists, is a directory and can be opened and searched;
2. with an upper: upper and work are on one filesystem and neither contains the other;
3. no mounted overlay uses any of the layers (refused only when a write is wanted);
4. per layer: filesystem type, read-only state, whether it lives on an overlay mount;
5. the xattr namespace (trusted.overlay.* or user.overlay.*);
6. the privilege to read that namespace, and xattr support per layer.

The old fsck.overlay got several of these wrong (prior-art.md section 2.4): it segfaulted
on a bad non-first lower (D2), compared mounted overlays by exact string and skipped
relative paths, and tested nesting with a substring test and reported a cross-filesystem
workdir as a "lower dir" problem (D7). Here layers are compared by device and inode.
"""
from __future__ import annotations

import ctypes
import errno
import os
import re
import stat
import struct
from dataclasses import dataclass
from typing import Optional, Sequence

import xattr

from ovlfsck.errors import OperationalError
from ovlfsck.stack import Layer, Role, Stack, split_escaped, unescape

MOUNTINFO = "/proc/self/mountinfo"

# include/uapi/linux/capability.h
CAP_SYS_ADMIN = 21

_TRUSTED_PREFIX = "trusted.overlay."
_USER_PREFIX = "user.overlay."
# OVL_XATTR_ESCAPE_PREFIX: names of a nested overlay, stored escaped by the outer one.
_ESCAPED_SUFFIX = "overlay."

# Cap on how many uses are spelled out in one refusal message.
_MAX_USES_SHOWN = 3


# --------------------------------------------------------------------------- results


@dataclass(frozen=True)
class LayerStatus:
    """What the pre-flight learned about one layer root."""

    layer: Layer
    st_dev: int
    st_ino: int
    fs_type: str  # from mountinfo, for the mount containing the layer root ("unknown" if not found)
    read_only: bool  # statvfs ST_RDONLY, or the mount (or its superblock) is ro
    xattr_ok: bool  # the root answered getxattr(<ns>.overlay.opaque) with data or ENODATA
    nested_overlay: bool  # the layer root itself lives on an overlayfs mount
    mountpoint: str = ""  # where the containing mount is mounted ("" if not found)
    mount_id: Optional[int] = None  # mountinfo field 1 of the containing mount, if known


@dataclass(frozen=True)
class Preflight:
    """The outcome of run_preflight(): per-layer facts plus notes for the user."""

    statuses: dict[str, LayerStatus]  # keyed by Layer.name
    namespace: str  # "trusted" or "user"
    namespace_note: Optional[str]
    mounted_by: tuple[str, ...]  # mountpoints of overlay mounts that use any of our layers
    notes: tuple[str, ...]


# --------------------------------------------------------------------------- mountinfo


@dataclass(frozen=True)
class MountEntry:
    """One line of /proc/self/mountinfo (see proc(5)); paths decoded."""

    mount_id: int
    parent_id: int
    dev: int
    root: str
    mountpoint: str
    mount_options: tuple[str, ...]
    fs_type: str
    source: str
    super_options: str  # as shown: still octal- and backslash-escaped

    @property
    def read_only(self) -> bool:
        """The mount (or its superblock) is read-only."""
        if "ro" in self.mount_options:
            return True
        return "ro" in split_escaped(self.super_options, ",")


_OCTAL = re.compile(rb"\\([0-3][0-7][0-7])")


def unoctal(text: str) -> str:
    """Undo the kernel's mangle()/seq_escape() octal escapes (`\\040` -> space)."""
    raw = os.fsencode(text)
    if b"\\" not in raw:
        return text
    return os.fsdecode(_OCTAL.sub(lambda m: bytes([int(m.group(1), 8)]), raw))


def parse_mountinfo_text(data: bytes | str) -> list[MountEntry]:
    """Parse mountinfo content; malformed lines are skipped."""
    if isinstance(data, bytes):
        data = os.fsdecode(data)
    entries: list[MountEntry] = []
    for line in data.splitlines():
        fields = line.split(" ")
        try:
            sep = fields.index("-", 6)
            major, minor = fields[2].split(":")
            entry = MountEntry(
                mount_id=int(fields[0]),
                parent_id=int(fields[1]),
                dev=os.makedev(int(major), int(minor)),
                root=unoctal(fields[3]),
                mountpoint=unoctal(fields[4]),
                mount_options=tuple(fields[5].split(",")),
                fs_type=unoctal(fields[sep + 1]),
                source=unoctal(fields[sep + 2]) if len(fields) > sep + 2 else "",
                super_options=" ".join(fields[sep + 3 :]),
            )
        except (ValueError, IndexError):
            continue
        entries.append(entry)
    return entries


def parse_mountinfo(mountinfo_path: str = MOUNTINFO) -> list[MountEntry]:
    """Read and parse a mountinfo file; an unreadable file is an operational error."""
    try:
        with open(mountinfo_path, "rb") as fh:
            data = fh.read()
    except OSError as exc:
        raise OperationalError(
            f"cannot read {mountinfo_path}: {exc.strerror or exc}"
        ) from exc
    return parse_mountinfo_text(data)


def overlay_layer_options(super_options: str) -> list[tuple[str, str]]:
    """The layer paths named by an overlay's super options, as (option, path).

    `option` is one of "upperdir", "workdir", "lowerdir", "datadir" (data-only layers,
    whether given after `::` or with `datadir+=`). The kernel shows each path as given at
    mount time (relative paths stay relative), backslash-escaping `\\`, `,` and `:`;
    mountinfo then octal-escapes some characters again (measured on 6.18:
    `l,b` -> `l\\134\\054b`, `l:c` -> `l\\134:c`, a space -> `\\040`). So: split on
    unescaped `,` first, then undo the octal escapes, then split `lowerdir=` on
    unescaped `:` and drop the backslashes.
    """
    result: list[tuple[str, str]] = []
    for item in split_escaped(super_options, ","):
        key, eq, raw = unoctal(item).partition("=")
        if not eq or not raw:
            continue
        if key == "lowerdir":
            in_data = False
            for part in split_escaped(raw, ":"):
                if part == "":
                    in_data = True  # the second ':' of '::'
                    continue
                result.append(("datadir" if in_data else "lowerdir", unescape(part)))
        elif key in ("lowerdir+", "datadir+"):
            result.append((key[:-1], unescape(raw)))
        elif key in ("upperdir", "workdir"):
            result.append((key, unescape(raw)))
    return result


# --------------------------------------------------------------------------- overlay uses


@dataclass(frozen=True)
class OverlayUse:
    """One of our layers is a layer of a mounted overlay."""

    mountpoint: str
    layer: Layer
    option: str  # "upperdir", "workdir", "lowerdir", "datadir"
    given: str  # the path as the mount shows it
    relative_base: Optional[str] = None  # for a relative path: where it resolved from
    suffix_only: bool = False  # relative path matched only as a suffix of our path
    root_inode_match: bool = False  # the overlay root has this layer's inode number

    def how(self) -> str:
        """How the mount names the layer, e.g. "its upperdir, given as relative 'u'"."""
        text = f"its {self.option}"
        if not self.given.startswith("/"):
            text += f", given as relative {self.given!r}"
            if self.suffix_only:
                text += ": matched by name only"
        return text

    def describe(self) -> str:
        return (
            f"{self.layer.name} {self.layer.path} is used by the overlay mounted on "
            f"{self.mountpoint} ({self.how()})"
        )


def _stat(path: str, cache: dict[str, Optional[os.stat_result]]) -> Optional[os.stat_result]:
    if path not in cache:
        try:
            cache[path] = os.stat(path)  # the kernel follows symlinks in layer paths too
        except (OSError, ValueError):
            cache[path] = None
    return cache[path]


def _ancestors(path: str) -> list[str]:
    """'/a/b/c' -> ['/a/b', '/a', '/']."""
    out: list[str] = []
    cur = os.path.dirname(path)
    while True:
        out.append(cur)
        parent = os.path.dirname(cur)
        if parent == cur:
            return out
        cur = parent


def _root_ids(stack: Stack) -> dict[tuple[int, int], Layer]:
    ids: dict[tuple[int, int], Layer] = {}
    for layer in stack.all_layers:
        try:
            st = os.stat(layer.path)
        except OSError:
            continue
        ids.setdefault((st.st_dev, st.st_ino), layer)
    return ids


def find_overlay_uses(
    stack: Stack,
    mounts: Sequence[MountEntry],
    root_ids: Optional[dict[tuple[int, int], Layer]] = None,
) -> list[OverlayUse]:
    """Every (overlay mount, our layer) pair where the mount uses that layer.

    Compared by device and inode, not by string. A relative path (shown as given at mount
    time; the mount's cwd is not recorded) is resolved against our cwd, the ancestors of
    the mountpoint (docker's overlay2 driver mounts with paths relative to the parent of
    the mountpoint's parent) and the ancestors of our layer roots; failing that, it
    matches when one of our layer paths ends with `/` + the normalised relative path.
    """
    if root_ids is None:
        root_ids = _root_ids(stack)
    layers = stack.all_layers
    by_path = {layer.path: layer for layer in layers}
    cache: dict[str, Optional[os.stat_result]] = {}
    layer_bases: list[str] = []
    seen_bases: set[str] = set()
    for layer in layers:
        for anc in _ancestors(layer.path):
            if anc not in seen_bases:
                seen_bases.add(anc)
                layer_bases.append(anc)
    try:
        cwd: Optional[str] = os.getcwd()
    except OSError:
        cwd = None

    uses: list[OverlayUse] = []
    for mount in mounts:
        if mount.fs_type != "overlay":
            continue
        options = overlay_layer_options(mount.super_options)
        has_upper = any(opt == "upperdir" for opt, _ in options)
        first_lower = next((p for opt, p in options if opt == "lowerdir"), None)
        found: dict[str, OverlayUse] = {}
        for opt, given in options:
            top_layer = opt == "upperdir" or (
                not has_upper and opt == "lowerdir" and given == first_lower
            )
            match: Optional[OverlayUse] = None
            if given.startswith("/"):
                st = _stat(given, cache)
                if st is not None:
                    layer = root_ids.get((st.st_dev, st.st_ino))
                else:
                    # Unstattable (e.g. EACCES): fall back to the string.
                    layer = by_path.get(os.path.normpath(given))
                if layer is not None:
                    match = OverlayUse(mount.mountpoint, layer, opt, given)
            else:
                bases: list[str] = []
                if cwd:
                    bases.append(cwd)
                bases.extend(_ancestors(mount.mountpoint))
                bases.extend(layer_bases)
                tried: set[str] = set()
                for base in bases:
                    if base in tried:
                        continue
                    tried.add(base)
                    st = _stat(os.path.join(base, given), cache)
                    if st is None:
                        continue
                    layer = root_ids.get((st.st_dev, st.st_ino))
                    if layer is not None:
                        match = OverlayUse(mount.mountpoint, layer, opt, given, relative_base=base)
                        break
                if match is None:
                    norm = os.path.normpath(given)
                    if norm not in (".", "..") and not norm.startswith("../"):
                        for layer in layers:
                            if layer.path.endswith("/" + norm):
                                match = OverlayUse(
                                    mount.mountpoint, layer, opt, given, suffix_only=True
                                )
                                break
                if match is not None and top_layer:
                    # An overlay root reports its top layer's inode number when the
                    # layers share a filesystem (measured on 6.18), so this corroborates
                    # a relative match.
                    mst = _stat(mount.mountpoint, cache)
                    lst = _stat(match.layer.path, cache)
                    if mst is not None and lst is not None and mst.st_ino == lst.st_ino:
                        match = OverlayUse(
                            match.mountpoint,
                            match.layer,
                            match.option,
                            match.given,
                            match.relative_base,
                            match.suffix_only,
                            root_inode_match=True,
                        )
            if match is not None and match.layer.name not in found:
                found[match.layer.name] = match
        order = {layer.name: i for i, layer in enumerate(layers)}
        uses.extend(sorted(found.values(), key=lambda u: order[u.layer.name]))
    return uses


def overlay_mounts_using(stack: Stack, mountinfo_path: str = MOUNTINFO) -> list[str]:
    """Mountpoints of the overlay mounts that use any layer of the stack (mountinfo order)."""
    uses = find_overlay_uses(stack, parse_mountinfo(mountinfo_path))
    return list(dict.fromkeys(use.mountpoint for use in uses))


def describe_uses(uses: Sequence[OverlayUse]) -> str:
    """One clause per mountpoint: "upper /u (its upperdir) and lower:0 /l (its lowerdir)
    are used by the overlay mounted on /m"."""
    by_mount: dict[str, list[OverlayUse]] = {}
    for use in uses:
        by_mount.setdefault(use.mountpoint, []).append(use)
    clauses: list[str] = []
    for mountpoint, group in by_mount.items():
        items = [f"{u.layer.name} {u.layer.path} ({u.how()})" for u in group]
        if len(items) > _MAX_USES_SHOWN:
            items = items[:_MAX_USES_SHOWN] + [f"{len(group) - _MAX_USES_SHOWN} more layers"]
        subject = items[0] if len(items) == 1 else ", ".join(items[:-1]) + " and " + items[-1]
        verb = "is" if len(items) == 1 else "are"
        clauses.append(f"{subject} {verb} used by the overlay mounted on {mountpoint}")
    return "; ".join(clauses)


def _refusal(uses: Sequence[OverlayUse]) -> str:
    them = "it" if len({use.mountpoint for use in uses}) == 1 else "them"
    return (
        f"{describe_uses(uses)}; unmount {them} before repairing (checking with -n is allowed)"
    )


# --------------------------------------------------------------------------- privileges


def has_cap_sys_admin(status_path: str = "/proc/self/status") -> bool:
    """CAP_SYS_ADMIN in the effective set (CapEff bit 21 of /proc/self/status).

    Without it, trusted.* xattrs are invisible: getxattr gives ENODATA and listxattr
    omits them, so their absence must never be inferred.
    """
    try:
        with open(status_path, encoding="ascii", errors="replace") as fh:
            for line in fh:
                if line.startswith("CapEff:"):
                    return bool((int(line.split()[1], 16) >> CAP_SYS_ADMIN) & 1)
    except (OSError, ValueError, IndexError):
        pass
    return os.geteuid() == 0


# --------------------------------------------------------------------------- namespace


def _names(path: str) -> list[str]:
    try:
        names = xattr.list(path, nofollow=True)
    except (OSError, TypeError):
        return []
    return [os.fsdecode(n) if isinstance(n, bytes) else n for n in names]


def _is_private(name: str, prefix: str) -> bool:
    """A private overlay xattr of that namespace; escaped (nested) names never count."""
    return name.startswith(prefix) and not name.startswith(prefix + _ESCAPED_SUFFIX)


def detect_namespace(stack: Stack) -> tuple[str, Optional[str]]:
    """("trusted" | "user", note or None).

    "user" when `userxattr` was given. Otherwise the upper root, work/index, work and each
    lower root are listed: any private trusted.overlay.* name means "trusted"; else any
    private user.overlay.* name means "user" (with a note saying so); else "trusted".
    """
    if stack.features.userxattr:
        return "user", None
    probes: list[tuple[str, str]] = []
    if stack.upper is not None:
        probes.append(("upper root", stack.upper.path))
    if stack.work is not None:
        probes.append(("work/index", os.path.join(stack.work.path, "index")))
        probes.append(("work", stack.work.path))
    for layer in stack.lowers:
        probes.append((f"{layer.name} root", layer.path))
    trusted_at: list[str] = []
    user_at: list[str] = []
    for where, path in probes:
        names = _names(path)
        if any(_is_private(n, _TRUSTED_PREFIX) for n in names):
            trusted_at.append(where)
        if any(_is_private(n, _USER_PREFIX) for n in names):
            user_at.append(where)
    if trusted_at:
        if user_at:
            return "trusted", (
                f"both trusted.overlay.* and user.overlay.* xattrs found ({user_at[0]} has "
                f"user.overlay.*); checking as trusted (give -o userxattr for the other)"
            )
        return "trusted", None
    if user_at:
        return "user", (
            f"user.overlay.* xattrs found on the {user_at[0]}; checking as userxattr"
        )
    return "trusted", None


# --------------------------------------------------------------------------- layer roots


_libc: Optional[ctypes.CDLL]
try:
    _libc = ctypes.CDLL(None, use_errno=True)
    _statx = _libc.statx
    _statx.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_uint, ctypes.c_void_p]
    _statx.restype = ctypes.c_int
except (OSError, AttributeError):  # pragma: no cover - glibc without statx
    _statx = None

_AT_EMPTY_PATH = 0x1000
_STATX_MNT_ID = 0x1000
_STX_MNT_ID_OFFSET = 144  # struct statx: stx_mnt_id follows stx_dev_minor


def _mount_id(fd: int) -> Optional[int]:
    """statx(STATX_MNT_ID) of an open fd: the mountinfo id of its mount (Linux >= 5.8)."""
    if _statx is None:
        return None
    buf = ctypes.create_string_buffer(256)
    if _statx(fd, b"", _AT_EMPTY_PATH, _STATX_MNT_ID, buf) != 0:
        return None
    (mask,) = struct.unpack_from("=I", buf.raw, 0)
    if not mask & _STATX_MNT_ID:
        return None
    (mnt_id,) = struct.unpack_from("=Q", buf.raw, _STX_MNT_ID_OFFSET)
    return mnt_id


def _is_within(child: str, parent: str) -> bool:
    """Path-prefix containment on normalised absolute paths ('/x/up' is not in '/x/upper')."""
    if child == parent:
        return True
    return child.startswith(parent if parent.endswith("/") else parent + "/")


def _containing_mount(
    path: str, st_dev: int, mount_id: Optional[int], mounts: Sequence[MountEntry]
) -> Optional[MountEntry]:
    if mount_id is not None:
        for mount in mounts:
            if mount.mount_id == mount_id:
                return mount
    # Fallback: the last-listed (top-most) mount with the longest mountpoint prefix,
    # preferring one whose device matches.
    best: Optional[MountEntry] = None
    for prefer_dev in (True, False):
        for mount in mounts:
            if prefer_dev and mount.dev != st_dev:
                continue
            if not _is_within(path, mount.mountpoint):
                continue
            if best is None or len(mount.mountpoint) >= len(best.mountpoint):
                best = mount
        if best is not None:
            return best
    return best


@dataclass(frozen=True)
class _Root:
    layer: Layer
    st: os.stat_result
    read_only: bool
    mount: Optional[MountEntry]
    mount_id: Optional[int]


def _root_error(layer: Layer, exc: OSError) -> str:
    if exc.errno in (errno.ENOENT, errno.ENOTDIR):
        reason = "no such directory"
    elif exc.errno in (errno.EACCES, errno.EPERM):
        reason = "permission denied"
    else:
        reason = (exc.strerror or str(exc)).lower()
    return f"{layer.name} {layer.path}: {reason}"


def _open_root(layer: Layer, mounts: Sequence[MountEntry]) -> _Root | str:
    """Open one layer root; return its facts or a one-sentence error."""
    try:
        lst = os.lstat(layer.path)
    except OSError as exc:
        return _root_error(layer, exc)
    if stat.S_ISLNK(lst.st_mode):
        return f"{layer.name} {layer.path}: not a directory (a symbolic link)"
    if not stat.S_ISDIR(lst.st_mode):
        return f"{layer.name} {layer.path}: not a directory"
    try:
        fd = os.open(layer.path, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except OSError as exc:
        return _root_error(layer, exc)
    try:
        st = os.fstat(fd)
        if not os.access(layer.path, os.R_OK | os.X_OK, effective_ids=True):
            return f"{layer.name} {layer.path}: permission denied"
        vfs = os.fstatvfs(fd)
        mount_id = _mount_id(fd)
    except OSError as exc:
        return _root_error(layer, exc)
    finally:
        os.close(fd)
    mount = _containing_mount(layer.path, st.st_dev, mount_id, mounts)
    read_only = bool(vfs.f_flag & os.ST_RDONLY) or bool(mount and mount.read_only)
    return _Root(layer, st, read_only, mount, mount_id)


def _walk_up_finds(path: str, target: tuple[int, int]) -> bool:
    """True if `target` (dev, ino) is `path` or one of its real ancestors.

    Walks `..` from the directory itself, so any spelling (symlinks, bind mounts) gives
    the parent chain the kernel sees.
    """
    try:
        fd = os.open(path, os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
    except OSError:
        return False
    try:
        for _ in range(4096):
            st = os.fstat(fd)
            if (st.st_dev, st.st_ino) == target:
                return True
            try:
                parent = os.open("..", os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC, dir_fd=fd)
            except OSError:
                return False
            pst = os.fstat(parent)
            os.close(fd)
            fd = parent
            if (pst.st_dev, pst.st_ino) == (st.st_dev, st.st_ino):
                return False  # reached /
        return False
    finally:
        os.close(fd)


def _fs_path(root: _Root) -> Optional[str]:
    """The layer's path inside its filesystem (mount root + path below the mountpoint)."""
    mount = root.mount
    if mount is None or not _is_within(root.layer.path, mount.mountpoint):
        return None
    rel = os.path.relpath(root.layer.path, mount.mountpoint)
    return os.path.normpath(os.path.join(mount.root, rel))


def _nested(a: _Root, b: _Root) -> bool:
    """Is one of the two directories the other or inside it?"""
    if _is_within(a.layer.path, b.layer.path) or _is_within(b.layer.path, a.layer.path):
        return True
    a_id = (a.st.st_dev, a.st.st_ino)
    b_id = (b.st.st_dev, b.st.st_ino)
    if _walk_up_finds(a.layer.path, b_id) or _walk_up_finds(b.layer.path, a_id):
        return True
    # Two mounts of one filesystem (bind mounts): compare paths inside the filesystem,
    # as the kernel's is_subdir() compares dentries.
    if a.st.st_dev == b.st.st_dev:
        pa, pb = _fs_path(a), _fs_path(b)
        if pa is not None and pb is not None and (_is_within(pa, pb) or _is_within(pb, pa)):
            return True
    return False


# --------------------------------------------------------------------------- the checks


def _probe_xattr(path: str, namespace: str) -> Optional[int]:
    """getxattr(<ns>.overlay.opaque) on the root: None if it answered, else the errno."""
    try:
        xattr.get(path, f"{namespace}.overlay.opaque", nofollow=True)
    except OSError as exc:
        if exc.errno == errno.ENODATA:
            return None
        return exc.errno or errno.EIO
    return None


def run_preflight(
    stack: Stack, *, want_write: bool, mountinfo_path: str = MOUNTINFO
) -> Preflight:
    """Run the pre-flight checks in order; raise OperationalError on the first refusal."""
    mounts = parse_mountinfo(mountinfo_path)
    notes: list[str] = []

    # 1. Every layer root exists and is a directory we can open and search. All layers
    # are checked (the old tool crashed on a bad 2nd/3rd lower, D2) and all failures named.
    roots: dict[str, _Root] = {}
    failures: list[str] = []
    for layer in stack.all_layers:
        result = _open_root(layer, mounts)
        if isinstance(result, str):
            failures.append(result)
        else:
            roots[layer.name] = result
    if failures:
        raise OperationalError("; ".join(failures))

    # 2. Upper and work: one filesystem, one mount, separate subtrees (D7).
    if stack.upper is not None and stack.work is not None:
        up, wk = roots[stack.upper.name], roots[stack.work.name]
        if up.st.st_dev != wk.st.st_dev:
            raise OperationalError(
                f"upperdir and workdir must be on the same filesystem: upper {up.layer.path} "
                f"is on {_fs_name(up)}, work {wk.layer.path} is on {_fs_name(wk)}"
            )
        if _nested(up, wk):
            raise OperationalError(
                f"workdir and upperdir must be separate subtrees: upper {up.layer.path}, "
                f"work {wk.layer.path}"
            )
        if up.mount_id is not None and wk.mount_id is not None and up.mount_id != wk.mount_id:
            # ovl_get_workdir() refuses this, and rename() between them gives EXDEV.
            where = (
                f"upper {up.layer.path} is under {_mp(up)}, work {wk.layer.path} is under "
                f"{_mp(wk)}"
            )
            if want_write:
                raise OperationalError(
                    f"workdir and upperdir must reside under the same mount: {where}; use "
                    f"paths through one mount, or -n to check"
                )
            notes.append(
                f"upper and work are on different mounts of one filesystem ({where}); the "
                f"kernel would refuse this: workdir and upperdir must reside under the same mount"
            )

    # 3. Mounted overlays that use our layers, by device and inode.
    root_ids: dict[tuple[int, int], Layer] = {}
    for root in roots.values():
        root_ids.setdefault((root.st.st_dev, root.st.st_ino), root.layer)
    uses = find_overlay_uses(stack, mounts, root_ids)
    if uses and want_write:
        raise OperationalError(_refusal(uses))
    if uses:
        notes.append(f"{describe_uses(uses)}: what is checked may change while it is mounted")
    mounted_by = tuple(dict.fromkeys(use.mountpoint for use in uses))

    # 4. Read-only layers and layers on overlay mounts.
    for root in roots.values():
        layer = root.layer
        if root.read_only:
            if layer.role in (Role.UPPER, Role.WORK):
                if want_write:
                    what = "upper layer" if layer.role is Role.UPPER else "workdir"
                    raise OperationalError(
                        f"{what} {layer.path} is on a read-only filesystem; use -n to check it"
                    )
                notes.append(f"{layer.name} {layer.path} is read-only")
            else:
                notes.append(f"{layer.name} is read-only: checked, never written")

    # 5. Namespace.
    namespace, namespace_note = detect_namespace(stack)

    # 6. Privilege, then xattr support per layer.
    if namespace == "trusted" and not has_cap_sys_admin():
        # Without CAP_SYS_ADMIN trusted.* reads give ENODATA, not EACCES: every xattr
        # would look absent.
        raise OperationalError("cannot read trusted.overlay.* xattrs: run as root or use userxattr")
    statuses: dict[str, LayerStatus] = {}
    for name, root in roots.items():
        layer = root.layer
        err = _probe_xattr(layer.path, namespace)
        xattr_ok = err is None
        if err is not None and err in (errno.EACCES, errno.EPERM):
            if namespace == "trusted":
                raise OperationalError(
                    "cannot read trusted.overlay.* xattrs: run as root or use userxattr"
                )
            raise OperationalError(
                f"cannot read user.overlay.* xattrs of {layer.name} {layer.path}: "
                f"{os.strerror(err).lower()}"
            )
        if err is not None and err not in (errno.ENOTSUP, errno.EOPNOTSUPP):
            raise OperationalError(
                f"{layer.name} {layer.path}: cannot read xattrs: {os.strerror(err).lower()}"
            )
        fs_type = root.mount.fs_type if root.mount else "unknown"
        nested = fs_type == "overlay"
        if not xattr_ok:
            notes.append(
                f"{layer.name} {layer.path}: its filesystem ({fs_type}) does not support "
                f"{namespace}.* xattrs; xattr checks are skipped there"
            )
        if nested:
            notes.append(
                f"{layer.name} {layer.path} is on the overlay mounted on {_mp(root)}: its "
                f"{namespace}.overlay.* xattrs are stored escaped "
                f"({namespace}.overlay.overlay.*) in that overlay's layers"
            )
        statuses[name] = LayerStatus(
            layer=layer,
            st_dev=root.st.st_dev,
            st_ino=root.st.st_ino,
            fs_type=fs_type,
            read_only=root.read_only,
            xattr_ok=xattr_ok,
            nested_overlay=nested,
            mountpoint=root.mount.mountpoint if root.mount else "",
            mount_id=root.mount_id,
        )

    return Preflight(
        statuses=statuses,
        namespace=namespace,
        namespace_note=namespace_note,
        mounted_by=mounted_by,
        notes=tuple(notes),
    )


def _fs_name(root: _Root) -> str:
    if root.mount is None:
        return f"device {os.major(root.st.st_dev)}:{os.minor(root.st.st_dev)}"
    return f"{root.mount.fs_type} ({root.mount.mountpoint})"


def _mp(root: _Root) -> str:
    return root.mount.mountpoint if root.mount else "?"


__all__ = [
    "LayerStatus",
    "Preflight",
    "MountEntry",
    "OverlayUse",
    "run_preflight",
    "detect_namespace",
    "overlay_mounts_using",
    "find_overlay_uses",
    "describe_uses",
    "has_cap_sys_admin",
    "parse_mountinfo",
    "parse_mountinfo_text",
    "overlay_layer_options",
    "unoctal",
]
