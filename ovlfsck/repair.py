"""Fix actions, the write-ahead journal, the quarantine and undo.

Every change ovlfsck makes to a layer is one of the operations below, applied through
`Journal.apply()`:

1. the operation is planned: its path is validated (layer-relative, no `..`/`.`/empty
   components, no NUL) and resolved without following symlinks (each parent opened with
   O_DIRECTORY|O_NOFOLLOW, the object itself only ever `lstat`ed, xattrs read and written
   with `nofollow=True` relative to the parent's descriptor); the state it is about to
   change is read;
2. a write-ahead record holding everything needed to restore that state is appended to the
   journal and fsynced (file and directory);
3. the change is made and its parent directories fsynced;
4. a `done` record is appended; the next record's fsync (at the latest the `end` record's)
   makes it durable: an operation without one is inspected by undo, never trusted.

`Journal.apply_batch()` group-commits xattr operations and renames (SetXattr, RemoveXattr,
Rename) the same way: every record of the batch is written and fsynced once before the
first change; the `done` records of all batches are written when the journal is closed,
after one syncfs of each filesystem the batches changed (until then, as after a crash, undo
inspects those operations).

Nothing is ever deleted: what `Quarantine` removes is renamed into
`<work>/ovlfsck/quarantine/<run-id>/<seq>` (same filesystem: the inode, its hard links —
such as the kernel's shared whiteout inode also linked from `work/index/#N` — and its xattrs
stay exactly as they were), or, for a layer on another filesystem, copied there and fsynced
before the original is removed. Objects that hold no data (a 0/0 whiteout, an empty
directory) on another filesystem are recorded in the journal in full and recreated by undo.

`undo()` reverts a journal's operations newest first, after checking that the layers on
disk are the ones the journal was written for; an operation whose `done` record is missing
(crash, error, Ctrl-C) is reverted after inspecting what actually happened.

The low-level helpers here touch the filesystem directly (design.md puts that in fsio.py);
they are private and written so they can move there unchanged.
"""
from __future__ import annotations

import base64
import ctypes
import errno
import fcntl
import json
import os
import socket
import stat
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Optional, Union

import xattr

from ovlfsck import __version__
from ovlfsck.errors import OperationalError
from ovlfsck.stack import Layer, Role, Stack

__all__ = [
    "JOURNAL_FORMAT", "Journal", "MakeDir", "MakeWhiteout", "Operation", "Quarantine",
    "RemoveXattr", "Rename", "SetXattr", "Link", "UndoReport", "UnsafePathError", "default_state_dir",
    "split_relpath", "undo",
]

JOURNAL_FORMAT = "ovlfsck/1"
STATE_DIRNAME = "ovlfsck"
QUARANTINE_DIRNAME = "quarantine"
DEFAULT_STATE_DIR = "/var/lib/ovlfsck"
STATE_DIR_ENV = "OVLFSCK_STATE_DIR"

_NAME_MAX = 255
_PATH_MAX = 4096

README_TEXT = """\
This directory was created by ovlfsck, the offline checker/repairer for overlayfs layers.

  journal-<run-id>.jsonl   one per repair run: every change made to the layers, written
                           (and fsynced) before the change was made
  quarantine/<run-id>/<n>  objects that repair run moved out of the layers (nothing is
                           deleted); <n> is the journal record's sequence number

To revert every change of one run (newest first), with the layers unmounted:

    ovlfsck undo <this directory>/journal-<run-id>.jsonl   [--dry-run]

The overlayfs kernel driver ignores extra entries in the workdir root, so this directory
does not affect mounting. Once you are satisfied with a repair, the journal and the
quarantine of that run may be removed (the run can then no longer be undone).
"""


class UnsafePathError(OperationalError, ValueError):
    """A path that would leave its layer, go through a symlink, or is malformed.

    An OperationalError (exit 8) for the CLI and a ValueError for callers that build
    operations from untrusted input such as xattr values.
    """


# --------------------------------------------------------------------------- paths


def split_relpath(relpath: str) -> tuple[str, ...]:
    """Validate a layer-relative path and return its components ('' -> ()).

    Refused (UnsafePathError, also a ValueError): anything but a str, an absolute path,
    NUL, empty/`.`/`..` components (so a trailing or doubled `/` too), a component over
    NAME_MAX bytes, a path over PATH_MAX bytes.
    """
    if not isinstance(relpath, str):
        raise UnsafePathError(f"layer-relative path must be a str, not {type(relpath).__name__}")
    if relpath == "":
        return ()
    if "\0" in relpath:
        raise UnsafePathError(f"{relpath!r}: NUL byte in path")
    if relpath.startswith("/"):
        raise UnsafePathError(f"{relpath!r}: absolute path where a layer-relative one is needed")
    if len(os.fsencode(relpath)) >= _PATH_MAX:
        raise UnsafePathError(f"{relpath[:64]!r}...: path too long")
    comps = tuple(relpath.split("/"))
    for comp in comps:
        if comp in ("", ".", ".."):
            raise UnsafePathError(
                f"{relpath!r}: component {comp!r} not allowed (the path must stay inside its layer)"
            )
        if len(os.fsencode(comp)) > _NAME_MAX:
            raise UnsafePathError(f"{relpath!r}: component longer than {_NAME_MAX} bytes")
    return comps


def _check_xattr_name(name: str) -> None:
    if not isinstance(name, str) or not name or "\0" in name:
        raise ValueError(f"invalid xattr name {name!r}")
    if len(os.fsencode(name)) > _NAME_MAX:
        raise ValueError(f"xattr name too long: {name[:64]!r}...")


def _show(layer_name: str, relpath: str) -> str:
    """`upper:/a/b` for messages; undecodable bytes of a name shown as \\xNN."""
    text = f"{layer_name}:/{relpath}"
    return text.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")


# --------------------------------------------------------------------------- operations


@dataclass(frozen=True)
class SetXattr:
    """Set xattr `name` to `value` on the object itself (never through a symlink)."""

    layer: Layer
    relpath: str
    name: str
    value: bytes

    def __post_init__(self) -> None:
        split_relpath(self.relpath)
        _check_xattr_name(self.name)
        if not isinstance(self.value, bytes):
            raise ValueError("xattr value must be bytes")

    def describe(self) -> str:
        return f"set {self.name}={_short(self.value)}"


@dataclass(frozen=True)
class RemoveXattr:
    """Remove xattr `name` from the object (it must be present)."""

    layer: Layer
    relpath: str
    name: str

    def __post_init__(self) -> None:
        split_relpath(self.relpath)
        _check_xattr_name(self.name)

    def describe(self) -> str:
        return f"remove {self.name}"


@dataclass(frozen=True)
class Quarantine:
    """Move the object (any type, any size) out of the layer into the quarantine."""

    layer: Layer
    relpath: str

    def __post_init__(self) -> None:
        if not split_relpath(self.relpath):
            raise UnsafePathError("a layer root cannot be quarantined")

    def describe(self) -> str:
        return "move to the quarantine"


@dataclass(frozen=True)
class MakeWhiteout:
    """Create a whiteout (0/0 char device, mode 0, root:root); nothing may exist there."""

    layer: Layer
    relpath: str

    def __post_init__(self) -> None:
        if not split_relpath(self.relpath):
            raise UnsafePathError("cannot create a whiteout at a layer root")

    def describe(self) -> str:
        return "create a whiteout"


@dataclass(frozen=True)
class MakeDir:
    """Create a (missing parent) directory; nothing may exist there."""

    layer: Layer
    relpath: str
    mode: int
    uid: int
    gid: int

    def __post_init__(self) -> None:
        if not split_relpath(self.relpath):
            raise UnsafePathError("cannot create a layer root")
        if not 0 <= self.mode <= 0o7777:
            raise ValueError(f"directory mode {self.mode:#o} is not a permission mode")
        if self.uid < 0 or self.gid < 0:
            raise ValueError("uid/gid must not be negative")

    def describe(self) -> str:
        return f"create directory (mode {self.mode:04o}, {self.uid}:{self.gid})"


@dataclass(frozen=True)
class Rename:
    """Rename within one layer (keeps the inode and its hard links); the target must not exist."""

    layer: Layer
    relpath: str
    new_relpath: str

    def __post_init__(self) -> None:
        if not split_relpath(self.relpath) or not split_relpath(self.new_relpath):
            raise UnsafePathError("a layer root cannot be renamed")
        if self.relpath == self.new_relpath:
            raise ValueError("rename onto itself")

    def describe(self) -> str:
        return f"rename to {self.new_relpath}"


@dataclass(frozen=True)
class Link:
    """Make `relpath` (of `layer`) a new hard link of the existing non-directory
    `src_relpath` of `src_layer` (on the same filesystem); nothing may exist at `relpath`.
    Used to tie an index entry to its upper alias again (the kernel's upper<->index link)."""

    layer: Layer
    relpath: str
    src_layer: Layer
    src_relpath: str

    def __post_init__(self) -> None:
        if not split_relpath(self.relpath) or not split_relpath(self.src_relpath):
            raise UnsafePathError("a layer root cannot be linked")

    def describe(self) -> str:
        return f"hard-link {self.src_layer.name}:{self.src_relpath} here"


Operation = Union[SetXattr, RemoveXattr, Quarantine, MakeWhiteout, MakeDir, Rename, Link]

_KIND = {
    SetXattr: "set_xattr",
    RemoveXattr: "remove_xattr",
    Quarantine: "quarantine",
    MakeWhiteout: "make_whiteout",
    MakeDir: "make_dir",
    Rename: "rename",
    Link: "link",
}


def _short(value: Optional[bytes], limit: int = 40) -> str:
    if value is None:
        return "(absent)"
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


# --------------------------------------------------------------------------- low level

_O_DIR = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
_O_PATHDIR = getattr(os, "O_PATH", 0) | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
_RENAME_NOREPLACE = 1

try:
    _libc = ctypes.CDLL(None, use_errno=True)
    _renameat2 = getattr(_libc, "renameat2", None)
    if _renameat2 is not None:
        _renameat2.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p,
                               ctypes.c_uint]
        _renameat2.restype = ctypes.c_int
except OSError:  # pragma: no cover - no libc
    _renameat2 = None


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def _unb64(text: str) -> bytes:
    return base64.b64decode(text.encode("ascii"), validate=True)


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="microseconds")


def _type_name(mode: int) -> str:
    for test, name in ((stat.S_ISREG, "reg"), (stat.S_ISDIR, "dir"), (stat.S_ISLNK, "lnk"),
                       (stat.S_ISCHR, "chr"), (stat.S_ISBLK, "blk"), (stat.S_ISFIFO, "fifo"),
                       (stat.S_ISSOCK, "sock")):
        if test(mode):
            return name
    return "unknown"


_TYPE_BITS = {"reg": stat.S_IFREG, "dir": stat.S_IFDIR, "lnk": stat.S_IFLNK,
              "chr": stat.S_IFCHR, "blk": stat.S_IFBLK, "fifo": stat.S_IFIFO,
              "sock": stat.S_IFSOCK}


def _is_whiteout(st: os.stat_result) -> bool:
    return stat.S_ISCHR(st.st_mode) and st.st_rdev == 0


def _lstat(dirfd: int, name: str) -> Optional[os.stat_result]:
    try:
        return os.stat(name, dir_fd=dirfd, follow_symlinks=False)
    except FileNotFoundError:
        return None


def _xpath(dirfd: int, name: str) -> bytes:
    """A path naming `name` inside the open directory `dirfd`.

    Only the /proc magic link to our own descriptor is followed; with nofollow=True the
    last component is not, so this is getxattrat(dirfd, name, AT_SYMLINK_NOFOLLOW).
    """
    return b"/proc/self/fd/%d/%s" % (dirfd, os.fsencode(name))


def _xattr_get(dirfd: int, name: str, xname: str) -> Optional[bytes]:
    try:
        return xattr.get(_xpath(dirfd, name), os.fsencode(xname), nofollow=True)
    except OSError as exc:
        if exc.errno in (errno.ENODATA, errno.ENOTSUP):
            return None
        raise


def _xattr_all(dirfd: int, name: str) -> dict[str, bytes]:
    path = _xpath(dirfd, name)
    try:
        names = xattr.list(path, nofollow=True)
    except OSError as exc:
        if exc.errno == errno.ENOTSUP:
            return {}
        raise
    out: dict[str, bytes] = {}
    for raw in names:
        try:
            out[os.fsdecode(raw)] = xattr.get(path, raw, nofollow=True)
        except OSError as exc:
            if exc.errno != errno.ENODATA:  # removed between list and get
                raise
    return out


def _xattr_set(dirfd: int, name: str, xname: str, value: bytes) -> None:
    xattr.set(_xpath(dirfd, name), os.fsencode(xname), value, nofollow=True)


def _xattr_remove(dirfd: int, name: str, xname: str) -> None:
    xattr.remove(_xpath(dirfd, name), os.fsencode(xname), nofollow=True)


def _fsync(fd: int) -> None:
    try:
        os.fsync(fd)
    except OSError as exc:
        # O_PATH descriptors cannot be fsynced; callers pass real ones where it matters.
        if exc.errno not in (errno.EBADF, errno.EINVAL):
            raise


def _rename_noreplace(olddir: int, old: str, newdir: int, new: str) -> None:
    """renameat2(RENAME_NOREPLACE): never replaces what is at the target."""
    if _renameat2 is not None:
        res = _renameat2(olddir, os.fsencode(old), newdir, os.fsencode(new), _RENAME_NOREPLACE)
        if res == 0:
            return
        err = ctypes.get_errno()
        if err not in (errno.EINVAL, errno.ENOSYS):
            raise OSError(err, os.strerror(err), old, None, new)
    # Filesystems without RENAME_NOREPLACE: check, then rename (the layers are offline).
    if _lstat(newdir, new) is not None:
        raise FileExistsError(errno.EEXIST, os.strerror(errno.EEXIST), new)
    os.rename(old, new, src_dir_fd=olddir, dst_dir_fd=newdir)


def _mnt_id(fd: int) -> Optional[int]:
    try:
        with open(f"/proc/self/fdinfo/{fd}", encoding="ascii") as fh:
            for line in fh:
                if line.startswith("mnt_id:"):
                    return int(line.split()[1])
    except (OSError, ValueError):
        pass
    return None


def _same_mount(fd1: int, fd2: int) -> bool:
    """Whether rename() between the two directories can work (same mount, not EXDEV)."""
    if os.fstat(fd1).st_dev != os.fstat(fd2).st_dev:
        return False
    m1, m2 = _mnt_id(fd1), _mnt_id(fd2)
    return m1 is None or m1 == m2


def _open_root(path: str, ident: Optional[tuple[int, int]] = None) -> int:
    """Open a layer root (already symlink-resolved); check its identity when given."""
    try:
        fd = os.open(path, _O_DIR)
    except OSError as exc:
        raise OperationalError(f"{path}: cannot open layer root: {exc.strerror}") from exc
    if ident is not None:
        st = os.fstat(fd)
        if (st.st_dev, st.st_ino) != tuple(ident):
            os.close(fd)
            raise OperationalError(
                f"{path}: the layer root is not the directory this journal was written for "
                f"(dev/ino {st.st_dev}/{st.st_ino}, recorded {ident[0]}/{ident[1]})"
            )
    return fd


def _walk_dirs(rootfd: int, comps: tuple[str, ...], where: str) -> int:
    """Open rootfd/comps... as a directory without following any symlink; a new fd."""
    cur = os.dup(rootfd)
    try:
        for i, comp in enumerate(comps):
            try:
                nxt = os.open(comp, _O_DIR, dir_fd=cur)
            except OSError as exc:
                sub = "/".join(comps[: i + 1])
                st = _lstat(cur, comp) if exc.errno in (errno.ELOOP, errno.ENOTDIR) else None
                if st is not None and stat.S_ISLNK(st.st_mode):
                    raise UnsafePathError(
                        f"{_show(where, sub)} is a symbolic link; refusing to go through it"
                    ) from exc
                if exc.errno == errno.EACCES:
                    nxt = os.open(comp, _O_PATHDIR, dir_fd=cur)
                elif exc.errno == errno.ENOENT:
                    raise OperationalError(f"{_show(where, sub)}: no such directory") from exc
                else:
                    raise OperationalError(f"{_show(where, sub)}: {exc.strerror}") from exc
            os.close(cur)
            cur = nxt
        return cur
    except BaseException:
        os.close(cur)
        raise


def _meta(dirfd: int, name: str, st: os.stat_result) -> dict:
    """Everything needed to recreate the object itself (not its contents)."""
    rec = {
        "type": _type_name(st.st_mode),
        "mode": stat.S_IMODE(st.st_mode),
        "uid": st.st_uid,
        "gid": st.st_gid,
        "rdev": st.st_rdev,
        "rdev_major": os.major(st.st_rdev),
        "rdev_minor": os.minor(st.st_rdev),
        "size": st.st_size,
        "nlink": st.st_nlink,
        "dev": st.st_dev,
        "ino": st.st_ino,
        "atime_ns": st.st_atime_ns,
        "mtime_ns": st.st_mtime_ns,
        "xattrs": {k: _b64(v) for k, v in sorted(_xattr_all(dirfd, name).items())},
    }
    if stat.S_ISLNK(st.st_mode):
        rec["target"] = _b64(os.fsencode(os.readlink(name, dir_fd=dirfd)))
    return rec


def _ident(st: os.stat_result) -> dict:
    return {"dev": st.st_dev, "ino": st.st_ino, "type": _type_name(st.st_mode)}


def _same_ident(st: Optional[os.stat_result], ident: dict) -> bool:
    return st is not None and st.st_dev == ident["dev"] and st.st_ino == ident["ino"]


def _apply_meta(dirfd: int, name: str, *, uid: int, gid: int, mode: int,
                xattrs: dict[str, bytes], atime_ns: int, mtime_ns: int) -> None:
    """Owner, mode, exactly these xattrs, then timestamps (in the order that keeps them).

    chown clears setuid/setgid and security.capability, so it comes first; timestamps last.
    """
    st = os.stat(name, dir_fd=dirfd, follow_symlinks=False)
    is_lnk = stat.S_ISLNK(st.st_mode)
    os.chown(name, uid, gid, dir_fd=dirfd, follow_symlinks=False)
    if not is_lnk:
        # Checked above that it is not a symlink: following the last component is safe.
        os.chmod(name, mode, dir_fd=dirfd)
    current = _xattr_all(dirfd, name)
    for xname in current:
        if xname not in xattrs:
            _xattr_remove(dirfd, name, xname)
    for xname, value in xattrs.items():
        if current.get(xname) != value:
            _xattr_set(dirfd, name, xname, value)
    os.utime(name, ns=(atime_ns, mtime_ns), dir_fd=dirfd, follow_symlinks=False)


def _apply_meta_from(dirfd: int, name: str, meta: dict) -> None:
    _apply_meta(dirfd, name, uid=meta["uid"], gid=meta["gid"], mode=meta["mode"],
                xattrs={k: _unb64(v) for k, v in meta["xattrs"].items()},
                atime_ns=meta["atime_ns"], mtime_ns=meta["mtime_ns"])


def _copy_data(infd: int, outfd: int, size: int) -> None:
    """Copy file contents, keeping holes where the source reports them."""
    pos = 0
    bufsize = 1 << 20
    while pos < size:
        try:
            start = os.lseek(infd, pos, os.SEEK_DATA)
            end = os.lseek(infd, start, os.SEEK_HOLE)
        except OSError as exc:
            if exc.errno == errno.ENXIO:  # only a hole is left
                break
            start, end = pos, size  # no SEEK_DATA support: copy everything
        end = min(end, size)
        if end <= start:
            break
        off = start
        while off < end:
            chunk = os.pread(infd, min(bufsize, end - off), off)
            if not chunk:  # shrank under us
                break
            view = memoryview(chunk)
            while view:
                n = os.pwrite(outfd, view, off)
                view = view[n:]
                off += n
        pos = end
    os.ftruncate(outfd, size)


def _open_file_nofollow(dirfd: int, name: str) -> int:
    flags = os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK | os.O_NOCTTY
    try:
        return os.open(name, flags | getattr(os, "O_NOATIME", 0), dir_fd=dirfd)
    except PermissionError:
        return os.open(name, flags, dir_fd=dirfd)


def _copy_obj(src_dir: int, src: str, dst_dir: int, dst: str, *, merge: bool,
              links: dict, top_dir: int, top_rel: str) -> None:
    """Copy one object (dirs recursively) from src_dir/src to dst_dir/dst, with metadata.

    Contents, mode, owner, all xattrs, atime/mtime; symlinks as symlinks; devices, fifos
    and sockets recreated; hard links between objects inside the tree are kept (`links`
    maps source (dev, ino) to the copy's path relative to `top_dir`). With `merge`,
    objects already at the destination are kept (used to restore into a partially removed
    tree): directories are merged and get their metadata back; a surviving file becomes
    the link target for its missing peers.
    """
    st = os.stat(src, dir_fd=src_dir, follow_symlinks=False)
    key = (st.st_dev, st.st_ino)
    existing = _lstat(dst_dir, dst) if merge else None
    if existing is not None:
        if stat.S_ISDIR(st.st_mode) and stat.S_ISDIR(existing.st_mode):
            _copy_children(src_dir, src, dst_dir, dst, merge=merge, links=links,
                           top_dir=top_dir, top_rel=top_rel)
            _apply_meta_from(dst_dir, dst, _meta(src_dir, src, st))
        elif not stat.S_ISDIR(st.st_mode) and st.st_nlink > 1:
            links.setdefault(key, top_rel)
        return
    if not stat.S_ISDIR(st.st_mode) and st.st_nlink > 1 and key in links:
        os.link(links[key], dst, src_dir_fd=top_dir, dst_dir_fd=dst_dir, follow_symlinks=False)
        return
    meta = _meta(src_dir, src, st)
    if stat.S_ISREG(st.st_mode):
        infd = _open_file_nofollow(src_dir, src)
        try:
            outfd = os.open(dst, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW
                            | os.O_CLOEXEC, 0o600, dir_fd=dst_dir)
            try:
                _copy_data(infd, outfd, st.st_size)
                os.fsync(outfd)
            finally:
                os.close(outfd)
        finally:
            os.close(infd)
    elif stat.S_ISDIR(st.st_mode):
        os.mkdir(dst, 0o700, dir_fd=dst_dir)
        _copy_children(src_dir, src, dst_dir, dst, merge=merge, links=links,
                       top_dir=top_dir, top_rel=top_rel)
    elif stat.S_ISLNK(st.st_mode):
        os.symlink(os.readlink(src, dir_fd=src_dir), dst, dir_fd=dst_dir)
    else:
        os.mknod(dst, stat.S_IFMT(st.st_mode) | 0o600, st.st_rdev, dir_fd=dst_dir)
    if not stat.S_ISDIR(st.st_mode) and st.st_nlink > 1:
        links[key] = top_rel
    _apply_meta_from(dst_dir, dst, meta)


def _surviving_links(src_dir: int, src: str, dst_dir: int, dst: str, links: dict,
                     top_rel: str) -> None:
    """Before a merge: multiply-linked files of the copy that still exist at the
    destination become the link targets of their missing peers (whatever the order)."""
    st = os.stat(src, dir_fd=src_dir, follow_symlinks=False)
    here = _lstat(dst_dir, dst)
    if here is None:
        return
    if stat.S_ISDIR(st.st_mode) and stat.S_ISDIR(here.st_mode):
        sfd = os.open(src, _O_DIR, dir_fd=src_dir)
        try:
            dfd = os.open(dst, _O_DIR, dir_fd=dst_dir)
            try:
                with os.scandir(sfd) as it:
                    names = sorted(e.name for e in it)
                for child in names:
                    _surviving_links(sfd, child, dfd, child, links, f"{top_rel}/{child}")
            finally:
                os.close(dfd)
        finally:
            os.close(sfd)
    elif not stat.S_ISDIR(st.st_mode) and st.st_nlink > 1:
        links.setdefault((st.st_dev, st.st_ino), top_rel)


def _copy_children(src_dir: int, src: str, dst_dir: int, dst: str, **kw) -> None:
    sfd = os.open(src, _O_DIR, dir_fd=src_dir)
    try:
        dfd = os.open(dst, _O_DIR, dir_fd=dst_dir)
        try:
            with os.scandir(sfd) as it:
                names = sorted(e.name for e in it)
            top_rel = kw.pop("top_rel")
            for child in names:
                _copy_obj(sfd, child, dfd, child, top_rel=f"{top_rel}/{child}", **kw)
            os.fsync(dfd)
        finally:
            os.close(dfd)
    finally:
        os.close(sfd)


def _remove_tree(dirfd: int, name: str) -> None:
    """Remove an object and, for a directory, everything under it; never follows symlinks."""
    st = os.stat(name, dir_fd=dirfd, follow_symlinks=False)
    if stat.S_ISDIR(st.st_mode):
        fd = os.open(name, _O_DIR, dir_fd=dirfd)
        try:
            with os.scandir(fd) as it:
                children = [e.name for e in it]
            for child in children:
                _remove_tree(fd, child)
            os.fsync(fd)
        finally:
            os.close(fd)
        os.rmdir(name, dir_fd=dirfd)
    else:
        os.unlink(name, dir_fd=dirfd)


def _dir_is_empty(dirfd: int, name: str) -> bool:
    fd = os.open(name, _O_DIR, dir_fd=dirfd)
    try:
        with os.scandir(fd) as it:
            return next(it, None) is None
    finally:
        os.close(fd)


def _recreate(dirfd: int, name: str, meta: dict) -> None:
    """Recreate a data-less object (whiteout, device, fifo, empty dir) from its record."""
    kind = meta["type"]
    if kind == "dir":
        os.mkdir(name, 0o700, dir_fd=dirfd)
    elif kind in ("chr", "blk", "fifo", "sock"):
        os.mknod(name, _TYPE_BITS[kind] | 0o600, meta["rdev"], dir_fd=dirfd)
    else:  # pragma: no cover - records are only written for the kinds above
        raise OperationalError(f"cannot recreate a {kind} from the journal alone")
    _apply_meta_from(dirfd, name, meta)


# --------------------------------------------------------------------------- stack identity


def _layer_record(layer: Layer) -> dict:
    rec = {"name": layer.name, "role": layer.role.value, "index": layer.index,
           "depth": layer.depth, "path": layer.path, "dev": None, "ino": None}
    try:
        st = os.stat(layer.path)
        rec["dev"], rec["ino"] = st.st_dev, st.st_ino
    except OSError:
        pass
    return rec


def _layer_from_record(rec: dict) -> Layer:
    return Layer(Role(rec["role"]), int(rec["index"]), rec["path"], int(rec["depth"]))


# --------------------------------------------------------------------------- the journal


def _new_run_id() -> str:
    now = time.time()
    stamp = time.strftime("%Y%m%dT%H%M%S", time.gmtime(now))
    return f"{stamp}.{int((now % 1) * 1e6):06d}Z-{os.getpid()}"


def default_state_dir(stack: Stack) -> str:
    """<work>/ovlfsck, or $OVLFSCK_STATE_DIR, or /var/lib/ovlfsck when there is no workdir."""
    if stack.work is not None:
        return os.path.join(stack.work.path, STATE_DIRNAME)
    return os.environ.get(STATE_DIR_ENV) or DEFAULT_STATE_DIR


class Journal:
    """The write-ahead journal of one repair run (see the module docstring).

    The file is created on the first `apply()`, so a run that changes nothing leaves no
    journal. It is held under an exclusive flock while open, so `undo` cannot run
    against a journal that is still being written.
    """

    def __init__(self, stack: Stack, directory: str, run_id: str) -> None:
        self.stack = stack
        self.directory = directory
        self.run_id = run_id
        self.path: Optional[str] = None
        self._fd: Optional[int] = None
        self._dirfd: Optional[int] = None
        self._qfd: Optional[int] = None
        self._seq = 0
        self._layers: dict[str, dict] = {}
        self._closed = False
        self._state_real: Optional[str] = None  # realpath of `directory`, once
        self._undone: list[dict] = []  # done records of batches, written at close
        self._unsynced: dict[str, Layer] = {}  # filesystems batches changed, synced at close

    @classmethod
    def create(cls, stack: Stack, directory: Optional[str] = None) -> "Journal":
        """A journal for `stack` in `directory` (default: `default_state_dir(stack)`)."""
        return cls(stack, directory or default_state_dir(stack), _new_run_id())

    # -- context manager
    def __enter__(self) -> "Journal":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    @property
    def quarantine_relpath(self) -> str:
        return f"{QUARANTINE_DIRNAME}/{self.run_id}"

    @property
    def count(self) -> int:
        """How many operations were journaled."""
        return self._seq

    # -- public API
    def apply(self, op: Operation) -> None:
        """Journal `op` (write-ahead, fsynced), make the change, then record it as done.

        Raises UnsafePathError/ValueError before touching anything for a bad path, and
        OperationalError when the change cannot be made (the journal then says so).
        """
        if self._closed:
            raise OperationalError("the journal is closed")
        kind = _KIND.get(type(op))
        if kind is None:
            raise TypeError(f"not a repair operation: {op!r}")
        layer = self._check_layer(op.layer)
        comps = split_relpath(op.relpath)
        moves = isinstance(op, (Quarantine, Rename))
        self._check_not_state(layer, comps, moves)
        if isinstance(op, Rename):
            self._check_not_state(layer, split_relpath(op.new_relpath), moves)
        with _Resolved(layer, comps, self._root_ident(layer)) as loc:
            planner = getattr(self, f"_plan_{kind}")
            rec, act = planner(op, loc)
            self._ensure_open()
            self._seq += 1
            seq = self._seq
            rec = {"rec": "op", "seq": seq, "op": kind, "layer": layer.name,
                   "path": op.relpath, "at": _now(), **rec}
            if kind == "quarantine":
                self._plan_quarantine_target(rec, loc)
            self._write(rec)
            try:
                result = act(rec)
            except BaseException as exc:
                self._write({"rec": "failed", "seq": seq, "at": _now(),
                             "error": f"{type(exc).__name__}: {exc}"}, best_effort=True)
                if isinstance(exc, OSError):
                    raise OperationalError(
                        f"{_show(layer.name, op.relpath)}: {op.describe()} failed: "
                        f"{exc.strerror or exc}; journal {self.path}"
                    ) from exc
                raise
            # Not fsynced on its own: the next record's fsync (or the end record's) takes it
            # along; until then undo treats the step as interrupted and inspects the object.
            self._write({"rec": "done", "seq": seq, "at": _now(), **(result or {})}, sync=False)

    def apply_batch(self, ops: list) -> list[Optional[str]]:
        """Group commit of xattr operations and renames (SetXattr, RemoveXattr, Rename): the
        same records and the same write-ahead rule as `apply()`, with one journal fsync for
        the whole batch instead of two or three per operation.

        Every operation is planned (its path checked, the state it changes read) and its
        record written; the journal is fsynced once, so no change is made before every
        record that restores it is on disk; the changes are made in order (each object
        checked to be the one planned); their `done` records are written by close(), after
        one syncfs of each filesystem the batches touched. Returns, per operation, None or
        why it failed (a failed operation does not stop the others). A bad path raises
        before anything of the batch is written. Directories are opened once per batch.
        """
        if self._closed:
            raise OperationalError("the journal is closed")
        planned = []
        for op in ops:
            if not isinstance(op, (SetXattr, RemoveXattr, Rename)):
                raise TypeError(f"not an operation that can be batched: {op!r}")
            layer = self._check_layer(op.layer)
            comps = split_relpath(op.relpath)
            moves = isinstance(op, Rename)
            self._check_not_state(layer, comps, moves)
            new_comps = None
            if moves:
                new_comps = split_relpath(op.new_relpath)
                self._check_not_state(layer, new_comps, moves)
                if not comps or not new_comps:
                    raise UnsafePathError(f"{_show(layer.name, op.relpath)}: the root cannot be moved")
            planned.append((op, layer, comps, new_comps))
        results: list[Optional[str]] = [None] * len(planned)
        records = []
        self._ensure_open()
        at = _now()  # one time for the batch's records (a group commit), not one per op
        with _DirCache(self) as dirs:
            for i, (op, layer, comps, new_comps) in enumerate(planned):
                try:
                    dirfd, name = dirs.parent(layer, comps)
                    st = _lstat(dirfd, name)
                    if st is None:
                        raise OperationalError(f"{_show(layer.name, op.relpath)}: no such file or directory")
                    if isinstance(op, Rename):
                        newdir, new_name = dirs.parent(layer, new_comps)
                        fields = _rename_rec(op, st, _lstat(newdir, new_name), layer.name)
                    else:
                        fields = _xattr_rec(op, st, _xattr_get(dirfd, name, op.name),
                                            _show(layer.name, op.relpath))
                    rec = {"rec": "op", "seq": 0, "op": _KIND[type(op)], "layer": layer.name,
                           "path": op.relpath, "at": at, **fields}
                except (OSError, OperationalError) as exc:
                    results[i] = getattr(exc, "strerror", None) or str(exc)
                    continue
                self._seq += 1
                rec["seq"] = self._seq
                records.append((i, rec))
            if not records:
                return results
            self._write_many([rec for _i, rec in records])
            self._sync()  # the write-ahead barrier: every record before any change
            failed: list[dict] = []
            done: list[int] = []  # seq of each op made
            roots: dict[str, Layer] = {}
            for i, rec in records:
                op, layer, comps, new_comps = planned[i]
                try:
                    dirfd, name = dirs.parent(layer, comps)
                    st = _lstat(dirfd, name)
                    if st is None or not _same_ident(st, rec["target"]):
                        raise OperationalError(
                            f"{_show(layer.name, op.relpath)}: replaced since it was planned")
                    if isinstance(op, SetXattr):
                        _xattr_set(dirfd, name, op.name, op.value)
                    elif isinstance(op, RemoveXattr):
                        _xattr_remove(dirfd, name, op.name)
                    else:
                        newdir, new_name = dirs.parent(layer, new_comps)
                        _rename_noreplace(dirfd, name, newdir, new_name)
                        dirs.moved(layer, comps)
                except (OSError, OperationalError) as exc:
                    why = getattr(exc, "strerror", None) or str(exc)
                    results[i] = why
                    failed.append({"rec": "failed", "seq": rec["seq"], "at": _now(),
                                   "error": f"{type(exc).__name__}: {why}"})
                    continue
                roots.setdefault(layer.path, layer)
                done.append(rec["seq"])
            if failed:
                self._write_many(failed)
            # The done records wait for the end of the run (close: one syncfs per touched
            # filesystem, then all of them): until then undo inspects these operations.
            done_at = _now()  # every change of the batch was made by then
            self._undone.extend({"rec": "done", "seq": seq, "at": done_at} for seq in done)
            for path, layer in roots.items():
                self._unsynced.setdefault(path, layer)
        return results

    def close(self) -> None:
        """Mark the run finished (when anything was journaled) and release the journal."""
        if self._closed:
            return
        self._closed = True
        try:
            if self._fd is not None:
                self._finish_batches()
                self._write({"rec": "end", "at": _now(), "ops": self._seq}, best_effort=True)
        finally:
            for fd in (self._qfd, self._dirfd, self._fd):
                if fd is not None:
                    os.close(fd)
            self._qfd = self._dirfd = self._fd = None

    def _finish_batches(self) -> None:
        """Make the batched changes durable (syncfs of each filesystem they touched), then
        record them as done."""
        if not self._undone:
            return
        try:
            for layer in self._unsynced.values():
                _syncfs(layer.path)
        except OSError:
            return  # not known to be on disk: left without done records (undo inspects)
        self._unsynced.clear()
        undone, self._undone = self._undone, []
        try:
            self._write_many(undone)
        except OperationalError:
            pass

    # -- checks
    def _check_layer(self, layer: Layer) -> Layer:
        for known in self.stack.all_layers:
            if known == layer:
                return known
        raise UnsafePathError(f"{layer.name} ({layer.path}) is not a layer of this stack")

    def _root_ident(self, layer: Layer) -> Optional[tuple[int, int]]:
        rec = self._layers.get(layer.name)
        if rec is None or rec["dev"] is None:
            return None
        return rec["dev"], rec["ino"]

    def _check_not_state(self, layer: Layer, comps: tuple[str, ...], moves: bool) -> None:
        """Never change our own journal and quarantine, nor move what contains them."""
        state = self._state_real
        if state is None:
            state = self._state_real = os.path.realpath(self.directory)
        target = os.path.join(layer.path, *comps) if comps else layer.path
        inside = state == target or target.startswith(state + "/")
        contains = state.startswith(target.rstrip("/") + "/")
        if inside or (moves and contains):
            raise UnsafePathError(
                f"{_show(layer.name, '/'.join(comps))} is (or contains) the ovlfsck state "
                f"directory {self.directory}; refusing to change it"
            )

    # -- planning: read the state, check preconditions, return (record fields, action)
    def _plan_set_xattr(self, op: SetXattr, loc: "_Resolved"):
        st = loc.stat_existing()
        rec = _xattr_rec(op, st, _xattr_get(loc.dirfd, loc.name, op.name), loc.show)

        def act(_rec):
            _xattr_set(loc.dirfd, loc.name, op.name, op.value)
            loc.sync_object(st)
        return rec, act

    def _plan_remove_xattr(self, op: RemoveXattr, loc: "_Resolved"):
        st = loc.stat_existing()
        rec = _xattr_rec(op, st, _xattr_get(loc.dirfd, loc.name, op.name), loc.show)

        def act(_rec):
            _xattr_remove(loc.dirfd, loc.name, op.name)
            loc.sync_object(st)
        return rec, act

    def _plan_make_whiteout(self, op: MakeWhiteout, loc: "_Resolved"):
        loc.require_absent()

        def act(_rec):
            os.mknod(loc.name, stat.S_IFCHR | 0o000, os.makedev(0, 0), dir_fd=loc.dirfd)
            # What the kernel creates (vfs_whiteout as the mounter's creds): root-owned.
            os.chown(loc.name, 0, 0, dir_fd=loc.dirfd, follow_symlinks=False)
            os.chmod(loc.name, 0, dir_fd=loc.dirfd)  # a chardev: chmod never follows it
            _fsync(loc.dirfd)
            return {"created": _ident(os.stat(loc.name, dir_fd=loc.dirfd,
                                              follow_symlinks=False))}
        return {}, act

    def _plan_make_dir(self, op: MakeDir, loc: "_Resolved"):
        loc.require_absent()
        rec = {"mode": op.mode, "uid": op.uid, "gid": op.gid}

        def act(_rec):
            os.mkdir(loc.name, 0o700, dir_fd=loc.dirfd)
            os.chown(loc.name, op.uid, op.gid, dir_fd=loc.dirfd, follow_symlinks=False)
            fd = os.open(loc.name, _O_DIR, dir_fd=loc.dirfd)
            try:
                os.fchmod(fd, op.mode)
                created = _ident(os.fstat(fd))
                os.fsync(fd)
            finally:
                os.close(fd)
            _fsync(loc.dirfd)
            return {"created": created}
        return rec, act

    def _plan_rename(self, op: Rename, loc: "_Resolved"):
        st = loc.stat_existing()
        new_comps = split_relpath(op.new_relpath)
        newdir = _walk_dirs(loc.rootfd, new_comps[:-1], loc.layer.name)
        loc.adopt(newdir)
        new_name = new_comps[-1]
        rec = _rename_rec(op, st, _lstat(newdir, new_name), loc.layer.name)

        def act(_rec):
            _rename_noreplace(loc.dirfd, loc.name, newdir, new_name)
            _fsync(newdir)
            if os.fstat(newdir).st_ino != os.fstat(loc.dirfd).st_ino:
                _fsync(loc.dirfd)
        return rec, act

    def _plan_link(self, op: Link, loc: "_Resolved"):
        loc.require_absent()
        src_layer = self._check_layer(op.src_layer)
        src_comps = split_relpath(op.src_relpath)
        self._check_not_state(src_layer, src_comps, False)
        with _Resolved(src_layer, src_comps, self._root_ident(src_layer)) as src:
            src_dirfd = os.dup(src.dirfd)
        loc.adopt(src_dirfd)
        src_name = src_comps[-1]
        sst = _lstat(src_dirfd, src_name)
        if sst is None:
            raise OperationalError(f"{_show(src_layer.name, op.src_relpath)}: no such file")
        if stat.S_ISDIR(sst.st_mode):
            raise OperationalError(f"{_show(src_layer.name, op.src_relpath)}: a directory cannot be hard-linked")
        rec = {"src_layer": src_layer.name, "src_path": op.src_relpath, "target": _ident(sst)}

        def act(_rec):
            now = _lstat(src_dirfd, src_name)
            if not _same_ident(now, rec["target"]):
                raise OperationalError(f"{_show(src_layer.name, op.src_relpath)}: changed before the link was made")
            os.link(src_name, loc.name, src_dir_fd=src_dirfd, dst_dir_fd=loc.dirfd,
                    follow_symlinks=False)
            _fsync(loc.dirfd)
        return rec, act

    def _plan_quarantine(self, op: Quarantine, loc: "_Resolved"):
        st = loc.stat_existing()
        meta = _meta(loc.dirfd, loc.name, st)
        return {"object": meta}, self._act_quarantine(loc, st)

    def _plan_quarantine_target(self, rec: dict, loc: "_Resolved") -> None:
        """Choose how to quarantine: rename (same mount), record (no data), or copy."""
        meta = rec["object"]
        qfd = self._quarantine_dir()
        if _same_mount(loc.dirfd, qfd):
            method = "rename"
        elif (meta["type"] == "chr" and meta["rdev"] == 0) or (
                meta["type"] == "dir" and _dir_is_empty(loc.dirfd, loc.name)):
            method = "record"
        else:
            method = "copy"
        rec["method"] = method
        rec["quarantine"] = None if method == "record" else \
            f"{self.quarantine_relpath}/{rec['seq']}"

    def _act_quarantine(self, loc: "_Resolved", st: os.stat_result):
        def act(rec):
            qname = str(rec["seq"])
            method = rec["method"]
            if method == "rename":
                _rename_noreplace(loc.dirfd, loc.name, self._qfd, qname)
                _fsync(self._qfd)
                _fsync(loc.dirfd)
            elif method == "record":
                now = _lstat(loc.dirfd, loc.name)
                if not _same_ident(now, rec["object"]):
                    raise OperationalError(f"{loc.show}: changed while being quarantined")
                if stat.S_ISDIR(st.st_mode):
                    os.rmdir(loc.name, dir_fd=loc.dirfd)
                else:
                    os.unlink(loc.name, dir_fd=loc.dirfd)
                _fsync(loc.dirfd)
            else:
                _copy_obj(loc.dirfd, loc.name, self._qfd, qname, merge=False, links={},
                          top_dir=self._qfd, top_rel=qname)
                _fsync(self._qfd)
                # The copy is complete and durable: only now may the original go.
                self._write({"rec": "copied", "seq": rec["seq"], "at": _now()})
                _remove_tree(loc.dirfd, loc.name)
                _fsync(loc.dirfd)
            return {"method": method}
        return act

    # -- files
    def _ensure_open(self) -> None:
        if self._fd is not None:
            return
        self._dirfd = _open_state_dir(self.stack, self.directory)
        for layer in self.stack.all_layers:
            self._layers[layer.name] = _layer_record(layer)
        name = f"journal-{self.run_id}.jsonl"
        for attempt in range(100):
            try:
                fd = os.open(name, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_APPEND
                             | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600, dir_fd=self._dirfd)
                break
            except FileExistsError:
                self.run_id = f"{_new_run_id()}-{attempt + 1}"
                name = f"journal-{self.run_id}.jsonl"
        else:  # pragma: no cover
            raise OperationalError(f"{self.directory}: cannot create a unique journal file")
        fcntl.flock(fd, fcntl.LOCK_EX)
        self._fd = fd
        self.path = os.path.join(self.directory, name)
        header = {"journal": JOURNAL_FORMAT, "run": self.run_id, "started": _now(),
                  "tool": f"ovlfsck {__version__}", "pid": os.getpid(),
                  "host": socket.gethostname(), "state_dir": self.directory,
                  "quarantine": self.quarantine_relpath,
                  "stack": {"describe": self.stack.describe(),
                            "layers": list(self._layers.values())}}
        self._write(header)
        os.fsync(self._dirfd)

    def _quarantine_dir(self) -> int:
        if self._qfd is None:
            qroot = _mkdir_at(self._dirfd, QUARANTINE_DIRNAME, self.directory)
            try:
                self._qfd = _mkdir_at(qroot, self.run_id, self.directory)
            finally:
                os.close(qroot)
        return self._qfd

    def _write(self, rec: dict, best_effort: bool = False, sync: bool = True) -> None:
        try:
            _append(self._fd, rec, sync)
        except OSError as exc:
            if best_effort:
                return
            raise OperationalError(f"{self.path}: cannot write the journal: {exc.strerror}") \
                from exc

    def _write_many(self, recs: list[dict]) -> None:
        """Append records with one write (not fsynced)."""
        data = "".join(_ENCODE(r) + "\n" for r in recs)
        view = memoryview(data.encode("utf-8", "surrogatepass"))
        try:
            while view:
                view = view[os.write(self._fd, view):]
        except OSError as exc:
            raise OperationalError(f"{self.path}: cannot write the journal: {exc.strerror}") \
                from exc

    def _sync(self) -> None:
        try:
            os.fsync(self._fd)
        except OSError as exc:
            raise OperationalError(f"{self.path}: cannot write the journal: {exc.strerror}") \
                from exc


_ENCODE = json.JSONEncoder(separators=(",", ":")).encode  # json.dumps makes one per call


def _append(fd: int, rec: dict, sync: bool = True) -> None:
    data = (_ENCODE(rec) + "\n").encode("utf-8", "surrogatepass")
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view):]
    if sync:
        os.fsync(fd)


_LIBC = None


def _syncfs(path: str) -> None:
    """syncfs(2) on the filesystem holding `path` (os.sync() where libc has no syncfs)."""
    global _LIBC
    if _LIBC is None:
        try:
            _LIBC = ctypes.CDLL(None, use_errno=True)
            _LIBC.syncfs.argtypes = [ctypes.c_int]
        except (OSError, AttributeError):
            _LIBC = False
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
    try:
        if not _LIBC or _LIBC.syncfs(fd) != 0:
            os.sync()
    finally:
        os.close(fd)


def _mkdir_at(dirfd: int, name: str, where: str, mode: int = 0o700) -> int:
    """Open dirfd/name as a directory, creating it (fsynced) when missing; no symlinks."""
    try:
        os.mkdir(name, mode, dir_fd=dirfd)
        os.fsync(dirfd)
    except FileExistsError:
        pass
    try:
        return os.open(name, _O_DIR, dir_fd=dirfd)
    except OSError as exc:
        raise OperationalError(f"{where}/{name}: not a usable directory "
                               f"({exc.strerror}); refusing to use it") from exc


def _open_state_dir(stack: Stack, directory: str) -> int:
    """Open (creating it, with its README) the state directory."""
    if stack.work is not None and os.path.realpath(directory) == os.path.join(
            stack.work.path, STATE_DIRNAME):
        rootfd = _open_root(stack.work.path)
        try:
            fd = _mkdir_at(rootfd, STATE_DIRNAME, stack.work.path)
        finally:
            os.close(rootfd)
    else:
        try:
            os.makedirs(directory, mode=0o700, exist_ok=True)
            fd = os.open(directory, _O_DIR)
        except OSError as exc:
            raise OperationalError(f"{directory}: cannot use as the ovlfsck state directory: "
                                   f"{exc.strerror}") from exc
    if _lstat(fd, "README.txt") is None:
        try:
            rfd = os.open("README.txt", os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW
                          | os.O_CLOEXEC, 0o644, dir_fd=fd)
            try:
                os.write(rfd, README_TEXT.encode())
                os.fsync(rfd)
            finally:
                os.close(rfd)
        except FileExistsError:
            pass
    return fd


def _xattr_rec(op, st: os.stat_result, old: Optional[bytes], show: str) -> dict:
    """The journal fields of a SetXattr/RemoveXattr planned on `st`, whose xattr is `old`."""
    if isinstance(op, RemoveXattr) and old is None:
        raise OperationalError(f"{show}: has no xattr {op.name} to remove")
    rec = {"name": op.name, "target": _ident(st),
           "old": {"present": old is not None, "value": _b64(old) if old is not None else None}}
    if isinstance(op, SetXattr):
        rec["value"] = _b64(op.value)
    return rec


def _rename_rec(op: "Rename", st: os.stat_result, at_target: Optional[os.stat_result],
                layer_name: str) -> dict:
    """The journal fields of a Rename planned on `st` (nothing may be at the target)."""
    if at_target is not None:
        raise OperationalError(f"{_show(layer_name, op.new_relpath)}: already exists")
    return {"new_path": op.new_relpath, "target": _ident(st)}


class _DirCache:
    """The directories of one batch, each opened once (like `_Resolved`: the layer root
    checked against the journal's identity, then one component at a time, never through a
    symlink). At most MAX directories stay open."""

    MAX = 256

    def __init__(self, journal: "Journal") -> None:
        self.journal = journal
        self.roots: dict[str, int] = {}
        self.dirs: dict[tuple[str, tuple[str, ...]], int] = {}

    def __enter__(self) -> "_DirCache":
        return self

    def __exit__(self, *exc) -> None:
        self._close(self.dirs)
        self._close(self.roots)

    @staticmethod
    def _close(fds: dict) -> None:
        for fd in fds.values():
            os.close(fd)
        fds.clear()

    def parent(self, layer: Layer, comps: tuple[str, ...]) -> tuple[int, str]:
        """(fd of the parent directory, name) of the object `comps` of `layer`."""
        if not comps:
            return self._root(layer), "."
        key = (layer.name, comps[:-1])
        fd = self.dirs.get(key)
        if fd is None:
            if len(self.dirs) >= self.MAX:
                self._close(self.dirs)
            fd = self.dirs[key] = _walk_dirs(self._root(layer), comps[:-1], layer.name)
        return fd, comps[-1]

    def _root(self, layer: Layer) -> int:
        fd = self.roots.get(layer.name)
        if fd is None:
            fd = self.roots[layer.name] = _open_root(layer.path, self.journal._root_ident(layer))
        return fd

    def moved(self, layer: Layer, comps: tuple[str, ...]) -> None:
        """`comps` was renamed: forget the directories opened through it."""
        n = len(comps)
        for key in [k for k in self.dirs if k[0] == layer.name and k[1][:n] == comps]:
            os.close(self.dirs.pop(key))


class _Resolved:
    """An object named by (layer, relpath): its parent opened safely, and its name.

    For the layer root itself, `dirfd` is the root and `name` is "." (only xattr
    operations accept the root).
    """

    def __init__(self, layer: Layer, comps: tuple[str, ...],
                 ident: Optional[tuple[int, int]] = None) -> None:
        self.layer = layer
        self.comps = comps
        self.ident = ident
        self.rootfd = -1
        self.dirfd = -1
        self._extra: list[int] = []

    @property
    def name(self) -> str:
        return self.comps[-1] if self.comps else "."

    @property
    def show(self) -> str:
        return _show(self.layer.name, "/".join(self.comps))

    def __enter__(self) -> "_Resolved":
        self.rootfd = _open_root(self.layer.path, self.ident)
        try:
            self.dirfd = _walk_dirs(self.rootfd, self.comps[:-1], self.layer.name) \
                if self.comps else os.dup(self.rootfd)
        except BaseException:
            os.close(self.rootfd)
            raise
        return self

    def __exit__(self, *exc) -> None:
        for fd in [self.dirfd, self.rootfd, *self._extra]:
            if fd >= 0:
                os.close(fd)

    def adopt(self, fd: int) -> None:
        self._extra.append(fd)

    def lstat(self) -> Optional[os.stat_result]:
        return _lstat(self.dirfd, self.name)

    def stat_existing(self) -> os.stat_result:
        st = self.lstat()
        if st is None:
            raise OperationalError(f"{self.show}: no such file or directory")
        return st

    def require_absent(self) -> None:
        if self.lstat() is not None:
            raise OperationalError(f"{self.show}: already exists")

    def sync_object(self, st: os.stat_result) -> None:
        """Make an inode change (xattrs) durable without opening devices or fifos."""
        if stat.S_ISREG(st.st_mode) or stat.S_ISDIR(st.st_mode):
            fd = _open_file_nofollow(self.dirfd, self.name)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        else:
            _fsync(self.dirfd)


# --------------------------------------------------------------------------- undo


class UndoReport(list):
    """The human lines of an undo (a list[str]); `refused` lists the steps not reverted."""

    def __init__(self) -> None:
        super().__init__()
        self.refused: list[str] = []
        self.reverted = 0


@dataclass
class _Step:
    seq: int
    rec: dict
    done: bool = False
    copied: bool = False
    failed: bool = False
    undone: bool = False
    restored: bool = False
    result: Optional[dict] = None


class _StepRefused(Exception):
    """This step cannot be reverted safely; the reason is the message."""


def _read_journal(fd: int, path: str) -> tuple[dict, list[dict], bool]:
    """(header, records, ends_with_newline); a torn last line is dropped."""
    os.lseek(fd, 0, os.SEEK_SET)
    chunks = []
    while True:
        chunk = os.read(fd, 1 << 20)
        if not chunk:
            break
        chunks.append(chunk)
    data = b"".join(chunks)
    lines = data.split(b"\n")
    complete = data.endswith(b"\n")
    if lines and lines[-1] == b"":
        lines.pop()
    records = []
    for i, line in enumerate(lines):
        try:
            records.append(json.loads(line.decode("utf-8", "surrogatepass")))
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            if i == len(lines) - 1 and not complete:
                break  # a write cut short by a crash: the record never took effect
            raise OperationalError(f"{path}: line {i + 1} is not a journal record ({exc})") \
                from exc
    if not records or records[0].get("journal") != JOURNAL_FORMAT:
        found = records[0].get("journal") if records and isinstance(records[0], dict) else None
        raise OperationalError(
            f"{path}: not an ovlfsck journal of format {JOURNAL_FORMAT}"
            + (f" (format {found!r})" if found else "")
        )
    return records[0], records[1:], complete


def _check_stack(header: dict, stack: Optional[Stack], path: str) -> dict[str, Layer]:
    """Refuse a journal written for other layers; the recorded layers by name."""
    recorded = header.get("stack", {})
    if stack is not None and recorded.get("describe") != stack.describe():
        raise OperationalError(
            f"{path}: this journal was written for another set of layers "
            f"({json.dumps(recorded.get('describe'))}); refusing to undo it on "
            f"{json.dumps(stack.describe())}"
        )
    layers: dict[str, Layer] = {}
    for rec in recorded.get("layers", []):
        try:
            st = os.stat(rec["path"])
        except OSError as exc:
            raise OperationalError(
                f"{path}: layer {rec['name']} ({rec['path']}) is not there any more: "
                f"{exc.strerror}; refusing to undo") from exc
        if rec.get("dev") is not None and (st.st_dev, st.st_ino) != (rec["dev"], rec["ino"]):
            raise OperationalError(
                f"{path}: layer {rec['name']} ({rec['path']}) is not the directory this journal "
                f"was written for (dev/ino {st.st_dev}/{st.st_ino}, recorded "
                f"{rec['dev']}/{rec['ino']}); refusing to undo")
        layers[rec["name"]] = _layer_from_record(rec)
    if stack is not None:
        for layer in stack.all_layers:
            if layers.get(layer.name, None) is None or layers[layer.name].path != layer.path:
                raise OperationalError(
                    f"{path}: this journal was written for another set of layers; "
                    f"{layer.name} ({layer.path}) differs")
    return layers


def undo(journal_path: str, stack: Optional[Stack] = None, *,
         dry_run: bool = False) -> list[str]:
    """Revert the completed (and inspect the interrupted) operations of one journal.

    Newest first. Returns one human line per step (an `UndoReport`, whose `refused`
    lists the steps that could not be reverted safely: they are skipped, the rest is
    reverted, and the journal is then not marked undone so that undo can be run again
    once the cause is fixed). Refuses (OperationalError) a journal of another stack, one
    still being written, one already undone, or one that is not a journal.
    """
    path = os.path.abspath(journal_path)
    try:
        fd = os.open(path, (os.O_RDONLY if dry_run else os.O_RDWR | os.O_APPEND)
                     | os.O_NOFOLLOW | os.O_CLOEXEC)
    except OSError as exc:
        raise OperationalError(f"{journal_path}: cannot open the journal: {exc.strerror}") \
            from exc
    try:
        try:
            fcntl.flock(fd, (fcntl.LOCK_SH if dry_run else fcntl.LOCK_EX) | fcntl.LOCK_NB)
        except BlockingIOError as exc:
            raise OperationalError(f"{journal_path}: in use by a running ovlfsck") from exc
        header, records, complete = _read_journal(fd, journal_path)
        steps: dict[int, _Step] = {}
        for rec in records:
            kind = rec.get("rec")
            if kind == "undone":
                raise OperationalError(
                    f"{journal_path}: already undone (at {rec.get('at', '?')}); refusing to "
                    "undo it again")
            seq = rec.get("seq")
            if kind == "op":
                steps[seq] = _Step(seq, rec)
            elif seq in steps:
                step = steps[seq]
                if kind == "done":
                    step.done = True
                    step.result = rec
                elif kind == "copied":
                    step.copied = True
                elif kind == "failed":
                    step.failed = True
                elif kind == "undo":
                    step.undone = True
                elif kind == "restored":
                    step.restored = True
        layers = _check_stack(header, stack, journal_path)
        state_dir = os.path.dirname(path)
        undoer = _Undoer(layers, state_dir, header, fd, dry_run, complete)
        report = UndoReport()
        touched: list[tuple[str, tuple[str, ...], bool]] = []
        for seq in sorted(steps, reverse=True):
            step = steps[seq]
            paths = _touched_paths(step.rec)
            if dry_run and not step.undone and any(
                    _depends(p, q) for p in paths for q in touched):
                # What this step finds depends on the newer steps being reverted first,
                # which a dry run does not do: say what it will do, check it then.
                where = _show(step.rec.get("layer", "?"), step.rec.get("path", ""))
                report.append(f"#{seq} {where}: would revert {step.rec.get('op')} (checked "
                              "once the newer steps above are reverted)")
            else:
                undoer.run(step, report)
            touched.extend(paths)
        if report.refused and dry_run:
            report.append(f"{len(report.refused)} step(s) would be refused")
        elif report.refused:
            report.append(f"{len(report.refused)} step(s) could not be reverted; the journal "
                          "is not marked undone: fix what is listed and run undo again")
        elif not dry_run:
            undoer.record({"rec": "undone", "at": _now(), "reverted": report.reverted})
            undoer.cleanup_quarantine()
        return report
    finally:
        os.close(fd)


def _touched_paths(rec: dict) -> list[tuple[str, tuple[str, ...], bool]]:
    """(layer, path components, whether the op creates/moves/removes the name)."""
    moves = rec.get("op") not in ("set_xattr", "remove_xattr")
    out = []
    for key in ("path", "new_path"):
        if isinstance(rec.get(key), str):
            try:
                out.append((rec.get("layer", "?"), split_relpath(rec[key]), moves))
            except ValueError:
                pass
    return out


def _depends(older: tuple, newer: tuple) -> bool:
    """Whether reverting `newer` first changes what `older` finds on disk."""
    if older[0] != newer[0]:
        return False
    if older[1] == newer[1]:
        return True
    return newer[2] and older[1][: len(newer[1])] == newer[1]


class _Undoer:
    def __init__(self, layers: dict[str, Layer], state_dir: str, header: dict, fd: int,
                 dry_run: bool, complete: bool) -> None:
        self.layers = layers
        self.state_dir = state_dir
        self.header = header
        self.fd = fd
        self.dry_run = dry_run
        self._needs_newline = not complete
        self.idents = {r["name"]: (r["dev"], r["ino"]) for r in header["stack"]["layers"]
                       if r.get("dev") is not None}

    def record(self, rec: dict) -> None:
        if self.dry_run:
            return
        if self._needs_newline:  # after a torn line, start a fresh one
            os.write(self.fd, b"\n")
            self._needs_newline = False
        _append(self.fd, rec)

    def run(self, step: _Step, report: UndoReport) -> None:
        rec = step.rec
        kind = rec.get("op")
        try:
            layer = self.layers[rec["layer"]]
        except KeyError:
            raise OperationalError(f"journal record #{step.seq} names an unknown layer "
                                   f"{rec.get('layer')!r}") from None
        where = f"#{step.seq} {_show(layer.name, rec['path'])}"
        if step.undone:
            report.append(f"{where}: {kind}: already reverted by an earlier undo")
            return
        prefix = "would " if self.dry_run else ""
        status = "" if step.done else (" (the run failed here)" if step.failed
                                        else " (no 'done' record: interrupted run)")
        handler = getattr(self, f"_undo_{kind}", None)
        if handler is None:
            raise OperationalError(f"journal record #{step.seq}: unknown operation {kind!r}")
        try:
            comps = split_relpath(rec["path"])
            with _Resolved(layer, comps, self.idents.get(layer.name)) as loc:
                message = handler(step, rec, loc, prefix)
        except (_StepRefused, OperationalError, OSError) as exc:
            reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
            line = f"{where}: {kind}{status}: refused: {reason}"
            report.refused.append(line)
            report.append(line)
            return
        report.append(f"{where}: {message}{status}")
        if not message.startswith("nothing"):
            report.reverted += 1
        self.record({"rec": "undo", "seq": step.seq, "at": _now()})

    # -- xattrs
    def _xattr_common(self, rec: dict, loc: _Resolved, new: Optional[bytes], prefix: str,
                      done: bool) -> str:
        st = loc.lstat()
        if not _same_ident(st, rec["target"]):
            raise _StepRefused(f"{loc.show} is no longer the object that was changed")
        name = rec["name"]
        old = _unb64(rec["old"]["value"]) if rec["old"]["present"] else None
        cur = _xattr_get(loc.dirfd, loc.name, name)
        if cur == old:
            return f"nothing to do: {name} is already {_short(old)}"
        if cur != new:
            raise _StepRefused(f"{name} was changed since ({_short(cur)}, expected "
                               f"{_short(new)}); leaving it")
        if not self.dry_run:
            if old is None:
                _xattr_remove(loc.dirfd, loc.name, name)
            else:
                _xattr_set(loc.dirfd, loc.name, name, old)
            loc.sync_object(st)
        return (f"{prefix}remove {name}" if old is None
                else f"{prefix}restore {name}={_short(old)}")

    def _undo_set_xattr(self, step, rec, loc, prefix):
        return self._xattr_common(rec, loc, _unb64(rec["value"]), prefix, step.done)

    def _undo_remove_xattr(self, step, rec, loc, prefix):
        return self._xattr_common(rec, loc, None, prefix, step.done)

    # -- created objects
    def _undo_make_whiteout(self, step, rec, loc, prefix):
        st = loc.lstat()
        created = self._created(step)
        if st is None:
            return "nothing to do: no whiteout there"
        if created is not None:
            if not _same_ident(st, created) or not _is_whiteout(st):
                raise _StepRefused("the object there is not the whiteout ovlfsck created")
        elif not (_is_whiteout(st) and st.st_nlink == 1 and stat.S_IMODE(st.st_mode) == 0):
            raise _StepRefused("something other than the whiteout ovlfsck was about to "
                               "create is there")
        if not self.dry_run:
            os.unlink(loc.name, dir_fd=loc.dirfd)
            _fsync(loc.dirfd)
        return f"{prefix}remove the whiteout it created"

    def _undo_make_dir(self, step, rec, loc, prefix):
        st = loc.lstat()
        created = self._created(step)
        if st is None:
            return "nothing to do: no directory there"
        if not stat.S_ISDIR(st.st_mode) or (created is not None and not _same_ident(st, created)):
            raise _StepRefused("the object there is not the directory ovlfsck created")
        if not _dir_is_empty(loc.dirfd, loc.name):
            raise _StepRefused("the directory ovlfsck created is not empty any more; leaving it")
        if not self.dry_run:
            os.rmdir(loc.name, dir_fd=loc.dirfd)
            _fsync(loc.dirfd)
        return f"{prefix}remove the directory it created"

    def _created(self, step: _Step) -> Optional[dict]:
        return step.result.get("created") if step.result else None

    # -- rename
    def _undo_rename(self, step, rec, loc, prefix):
        new_comps = split_relpath(rec["new_path"])
        newdir = _walk_dirs(loc.rootfd, new_comps[:-1], loc.layer.name)
        loc.adopt(newdir)
        new_name = new_comps[-1]
        at_new, at_old = _lstat(newdir, new_name), loc.lstat()
        if _same_ident(at_new, rec["target"]) and at_old is None:
            if not self.dry_run:
                _rename_noreplace(newdir, new_name, loc.dirfd, loc.name)
                _fsync(loc.dirfd)
                _fsync(newdir)
            return f"{prefix}rename {rec['new_path']} back"
        if _same_ident(at_old, rec["target"]):
            return "nothing to do: it was never renamed"
        raise _StepRefused(f"neither {rec['new_path']} nor the original name holds the renamed "
                           "object alone")

    # -- link
    def _undo_link(self, step, rec, loc, prefix):
        st = loc.lstat()
        if st is None:
            return "nothing to do: no link there"
        if not _same_ident(st, rec["target"]):
            raise _StepRefused("the object there is not the one ovlfsck linked")
        if st.st_nlink < 2:
            raise _StepRefused("it is the object's only link now; leaving it")
        if not self.dry_run:
            os.unlink(loc.name, dir_fd=loc.dirfd)
            _fsync(loc.dirfd)
        return f"{prefix}remove the hard link it made"

    # -- quarantine
    def _qdir(self, rec: dict, create: bool = False) -> tuple[int, str]:
        """The quarantine run directory of `rec` (opened) and the entry name."""
        qrel = rec.get("quarantine")
        comps = split_relpath(qrel)
        if len(comps) != 3 or comps[0] != QUARANTINE_DIRNAME:
            raise OperationalError(f"journal record #{rec['seq']}: bad quarantine path {qrel!r}")
        rootfd = os.open(self.state_dir, _O_DIR)
        try:
            return _walk_dirs(rootfd, comps[:2], self.state_dir), comps[2]
        finally:
            os.close(rootfd)

    def _undo_quarantine(self, step, rec, loc, prefix):
        meta = rec["object"]
        method = rec.get("method")
        here = loc.lstat()
        if method == "record":
            if here is None:
                # Absent: removed by the run (done, or interrupted right after the unlink).
                if not self.dry_run:
                    _recreate(loc.dirfd, loc.name, meta)
                    _fsync(loc.dirfd)
                extra = (f"; it had {meta['nlink']} links, the others are not re-linked"
                         if meta["nlink"] > 1 and meta["type"] != "dir" else "")
                return f"{prefix}recreate the {meta['type']} from the journal{extra}"
            if _same_ident(here, meta):
                return "nothing to do: the object was never removed"
            raise _StepRefused(f"{loc.show} exists again (a different object); not recreating")
        qfd, qname = self._qdir(rec)
        loc.adopt(qfd)
        inq = _lstat(qfd, qname)
        if method == "rename":
            if here is None and _same_ident(inq, meta):
                if not self.dry_run:
                    _rename_noreplace(qfd, qname, loc.dirfd, loc.name)
                    _fsync(loc.dirfd)
                    _fsync(qfd)
                return f"{prefix}rename back from {rec['quarantine']}"
            if inq is None and _same_ident(here, meta):
                return "nothing to do: it was never moved"
            if here is not None:
                raise _StepRefused(f"{loc.show} exists again; the quarantined object stays in "
                                   f"{os.path.join(self.state_dir, rec['quarantine'])}")
            raise _StepRefused(f"the quarantined object is missing from "
                               f"{os.path.join(self.state_dir, rec['quarantine'])}")
        if method != "copy":
            raise OperationalError(f"journal record #{rec['seq']}: unknown method {method!r}")
        if not (step.done or step.copied):
            # The copy was never completed, so the original was never touched.
            if here is not None and _same_ident(here, meta):
                left = f"; an incomplete copy is left in {rec['quarantine']}" if inq else ""
                return f"nothing to do: the original was never removed{left}"
            raise _StepRefused("the copy never completed, yet the original is not in place")
        if inq is None:
            if here is not None and _same_ident(here, meta):
                return "nothing to do: already restored"
            raise _StepRefused(f"the quarantined copy {rec['quarantine']} is missing")
        if step.restored:
            # An earlier undo copied it back and died while removing the duplicate.
            if not self.dry_run:
                _remove_tree(qfd, qname)
                _fsync(qfd)
            return f"{prefix}finish: remove the quarantined copy (already copied back)"
        # Only the original itself, half removed by an interrupted run, is merged into;
        # anything else at that name is someone else's and is left alone.
        if here is not None and (step.done or not _same_ident(here, meta)):
            raise _StepRefused(f"{loc.show} exists again (a different object); the copy stays "
                               f"in {os.path.join(self.state_dir, rec['quarantine'])}")
        if not self.dry_run:
            links: dict = {}
            _surviving_links(qfd, qname, loc.dirfd, loc.name, links, loc.name)
            _copy_obj(qfd, qname, loc.dirfd, loc.name, merge=True, links=links,
                      top_dir=loc.dirfd, top_rel=loc.name)
            _apply_meta_from(loc.dirfd, loc.name, meta)
            _fsync(loc.dirfd)
            # Restored and durable: the quarantined copy is now a duplicate.
            self.record({"rec": "restored", "seq": step.seq, "at": _now()})
            _remove_tree(qfd, qname)
            _fsync(qfd)
        partial = " (merged into what was left)" if here is not None else ""
        extra = (f"; it had {meta['nlink']} links, the others are not re-linked"
                 if meta["nlink"] > 1 and meta["type"] != "dir" else "")
        return f"{prefix}copy back from {rec['quarantine']}{partial}{extra}"

    def cleanup_quarantine(self) -> None:
        """Remove the run's quarantine directory once it is empty (best effort)."""
        qrel = self.header.get("quarantine")
        if not qrel:
            return
        try:
            comps = split_relpath(qrel)
            rootfd = os.open(self.state_dir, _O_DIR)
            try:
                parent = _walk_dirs(rootfd, comps[:-1], self.state_dir)
                try:
                    os.rmdir(comps[-1], dir_fd=parent)
                    os.fsync(parent)
                finally:
                    os.close(parent)
            finally:
                os.close(rootfd)
        except (OSError, OperationalError):
            pass  # not created (no Quarantine), or not empty: both are fine


