"""work/index: entry names, what each entry stands for, and the nlink xattr.

The kernel's view (overlay-format.md §9, measured on 6.18): every entry but `#N`
temporaries is named by the hex of the origin file handle of a lower object and is

- a file entry: the same inode as the upper aliases of that object (`origin` = the name,
  `nlink` = the overlay link count relative to the upper inode's);
- a directory entry (nfs_export): an empty directory whose `upper` is the handle of the
  upper directory, whose `origin` must be the name;
- a whiteout (nfs_export): every alias of the object was deleted.

At mount (`ovl_indexdir_cleanup`) the kernel fails on some inconsistencies, deletes or whites
out others, and keeps the rest unverified; at lookup a whiteout or a wrong-type entry for a
visible object fails with EIO ("bad index found"). The checks here follow that, with one
rule for false positives: what the kernel makes itself is never an error.

During the walk the pass collects only what concerns existing entries: upper non-directories
whose `origin` names an entry (lstat-ed for their inode), and the lower objects of entries
that are visible in the merged view (lstat-ed only while some entry needs it). Memory grows
with the number of index entries, not with the number of layer entries.

Lower objects are found by decoding the name with open_by_handle_at (needs
CAP_DAC_READ_SEARCH); when that is not possible the checks that depend on it are skipped.
"""
from __future__ import annotations

import ctypes
import errno
import os
import re
import stat
from dataclasses import dataclass
from typing import Optional

from ovlfsck import handles, rehandle
from ovlfsck.engine import CheckContext, Finding
from ovlfsck.fsio import CompactStat, Kind, quoted, same_data, sort_names, special_items
from ovlfsck.problems import BY_CODE
from ovlfsck.repair import Link, MakeWhiteout, Quarantine, Rename, SetXattr
from ovlfsck.stack import Layer
from ovlfsck.walk import DirVisit, join

# --------------------------------------------------------------------------- handles

_STALE = "stale"
_UNKNOWN = "unknown"


class _FileHandle(ctypes.Structure):
    _fields_ = [
        ("handle_bytes", ctypes.c_uint),
        ("handle_type", ctypes.c_int),
        ("f_handle", ctypes.c_ubyte * handles.MAX_HANDLE_SZ),
    ]


_libc = ctypes.CDLL(None, use_errno=True)

# Errors meaning "this fid names nothing on this filesystem" (ESTALE for the kernel too).
_STALE_ERRNOS = (errno.ESTALE, errno.ENOENT, errno.EINVAL, errno.ELOOP)


def open_by_handle(mount_fd: int, fid_type: int, fid: bytes) -> int:
    """An O_PATH descriptor for the object (fid_type, fid) on the filesystem of `mount_fd`
    (an fd opened without O_PATH). Raises OSError (ESTALE: no such object).

    Uses handles.open_by_handle_at when handles.py has it; the ctypes call here is the same
    and only kept as a fallback."""
    shared = getattr(handles, "open_by_handle_at", None)
    if shared is not None:
        return shared(mount_fd, fid_type, fid, os.O_PATH)
    if len(fid) > handles.MAX_HANDLE_SZ:
        raise OSError(errno.EINVAL, "fid longer than MAX_HANDLE_SZ")
    fh = _FileHandle()
    fh.handle_bytes = len(fid)
    fh.handle_type = fid_type
    ctypes.memmove(fh.f_handle, fid, len(fid))
    fd = _libc.open_by_handle_at(mount_fd, ctypes.byref(fh), os.O_PATH | os.O_CLOEXEC)
    if fd < 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))
    return fd


@dataclass(slots=True)
class _Obj:
    """A real object a handle decodes to."""

    layer: Layer  # the layer whose filesystem decoded it (for a lower non-dir: any of them)
    st: CompactStat
    path: Optional[str] = None  # only for directories (decoded connected)

    @property
    def key(self) -> tuple[int, int]:
        return (self.st.st_dev, self.st.st_ino)

    @property
    def is_dir(self) -> bool:
        return stat.S_ISDIR(self.st.st_mode)


def _fh_key(raw: Optional[bytes]) -> Optional[str]:
    """The index name a stored origin value stands for (hex of its `len` bytes)."""
    if not raw:
        return None
    try:
        handles.decode(raw)
    except (handles.HandleError, handles.UnknownHandle):
        return None
    return raw[: raw[2]].hex()


def _same_fh(a: bytes, b: bytes) -> bool:
    """ovl_verify_fh: same fb.len and the same bytes over it."""
    return len(a) >= 3 and len(b) >= 3 and a[2] == b[2] and a[: a[2]] == b[: b[2]]


def _under(path: str, root: str) -> Optional[str]:
    root = root.rstrip("/") or "/"
    if path == root:
        return ""
    prefix = root if root.endswith("/") else root + "/"
    return path[len(prefix):] if path.startswith(prefix) else None


# --------------------------------------------------------------------------- nlink

_NLINK_RE = re.compile(rb"[LU][+-][0-9]+\n?\Z")


def parse_nlink(raw: Optional[bytes]) -> Optional[tuple[str, int]]:
    """('U'|'L', delta) as ovl_get_nlink parses it (12 bytes at most, kstrtoint), else None."""
    if raw is None or len(raw) > 12 or not _NLINK_RE.match(raw):
        return None
    delta = int(raw[1:])
    if not -(2 ** 31) <= delta < 2 ** 31:
        return None
    return chr(raw[0]), delta


# --------------------------------------------------------------------------- state


@dataclass
class _Alias:
    merged: str  # merged path
    where: str  # layer:relpath
    upper_parent: Optional[str]  # relpath of the upper directory it is listed in, if any
    has_upper: bool = False  # (directories) the merged directory has an upper directory


@dataclass(slots=True)
class _Entry:
    name: str
    dir: str  # the index directory's path (one str for all entries)
    fh: handles.OvlFh
    st: CompactStat
    kind: str  # 'whiteout' | 'dir' | 'file'
    lower: object = None  # _Obj | _STALE | _UNKNOWN | None (not decoded)
    wanted: bool = False  # its lower aliases are looked for during the walk
    # Each a list once it has an item; until then a shared empty tuple (an index keeps one
    # entry per indexed object until the end of the walk: three empty lists each, else).
    aliases: "list[str] | tuple" = ()  # upper relpaths, same inode
    claims: "list[str] | tuple" = ()  # upper relpaths whose origin is the name
    visible: "list[_Alias] | tuple" = ()  # lower aliases visible in the merged view

    @property
    def key(self) -> tuple[int, int]:
        return (self.st.st_dev, self.st.st_ino)

    @property
    def rel(self) -> str:
        """Its workdir-relative path, "index/<name>"."""
        return f"index/{self.name}"

    @property
    def path(self) -> str:
        return os.path.join(self.dir, self.name)


def _add(e: _Entry, field_name: str, item) -> None:
    got = getattr(e, field_name)
    if got:
        got.append(item)
    else:
        setattr(e, field_name, [item])


class _State:
    def __init__(self) -> None:
        self.active = False
        self.entries: dict[str, _Entry] = {}
        self.lower_files: dict[tuple[int, int], list[_Entry]] = {}
        self.lower_inos: set[int] = set()  # the st_ino of lower_files' keys (a quick filter)
        self.lower_dirs: dict[tuple[int, int], list[_Entry]] = {}
        self.nfs = False


def _index_used(ctx: CheckContext) -> bool:
    return (ctx.stack.work is not None and ctx.stack.upper is not None
            and ctx.stack.features.index is not False)


def _state(ctx: CheckContext) -> _State:
    return ctx.round_state("index", lambda: _build(ctx))


def _kind(s: os.stat_result) -> str:
    if stat.S_ISCHR(s.st_mode) and s.st_rdev == 0:
        return "whiteout"
    return "dir" if stat.S_ISDIR(s.st_mode) else "file"


def _build(ctx: CheckContext) -> _State:
    st = _State()
    if not _index_used(ctx):
        return st
    index_dir = os.path.join(ctx.stack.work.path, "index")
    try:
        with os.scandir(index_dir) as it:
            names = sorted((de.name for de in it), key=os.fsencode)
    except OSError:
        return st  # missing / unreadable: reported by finish (names) or the workdir pass
    decoder = _Decoder(ctx)
    try:
        for name in names:
            if name.startswith("#"):
                continue
            try:
                fh = handles.decode_index_name(name)
            except (handles.HandleError, handles.UnknownHandle):
                continue  # OVL601
            path = os.path.join(index_dir, name)
            try:
                s = os.lstat(path)
            except OSError:
                continue
            e = _Entry(name, index_dir, fh, CompactStat(s), _kind(s))
            st.entries[name] = e
        st.nfs = bool(ctx.stack.features.nfs_export) or (
            ctx.stack.features.nfs_export is None
            and any(e.kind == "dir" for e in st.entries.values()))
        for e in st.entries.values():
            if e.kind == "dir" and not st.nfs:
                continue  # not verified, not used without nfs_export
            e.lower = decoder.lower(e.fh)
            if not isinstance(e.lower, _Obj):
                continue
            # Whose lower aliases matter: whiteouts (reachable?), entries without another
            # link (orphan?), lower objects with hardlinks (nlink), directories.
            if e.lower.is_dir:
                if st.nfs:
                    e.wanted = True
                    st.lower_dirs.setdefault(e.lower.key, []).append(e)
            elif e.kind != "file" or e.st.st_nlink == 1 or e.lower.st.st_nlink > 1:
                e.wanted = True
                st.lower_files.setdefault(e.lower.key, []).append(e)
                st.lower_inos.add(e.lower.key[1])
    finally:
        decoder.close()
    st.active = bool(st.entries)
    return st


class _Decoder:
    """Decodes handles on the layers' filesystems, as ovl_decode_real_fh does."""

    def __init__(self, ctx: CheckContext) -> None:
        self.ctx = ctx
        self.fds: dict[str, int] = {}
        self.devs: dict[str, Optional[int]] = {}

    def close(self) -> None:
        for fd in self.fds.values():
            os.close(fd)
        self.fds.clear()

    def _mount_fd(self, layer: Layer) -> int:
        fd = self.fds.get(layer.name)
        if fd is None:
            fd = os.open(layer.path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
            self.fds[layer.name] = fd
        return fd

    def _decode(self, layer: Layer, fh: handles.OvlFh) -> object:
        try:
            mount_fd = self._mount_fd(layer)
        except OSError:
            return _UNKNOWN
        try:
            fd = open_by_handle(mount_fd, fh.fid_type, fh.fid)
        except OSError as exc:
            if exc.errno in _STALE_ERRNOS:
                return _STALE
            return _UNKNOWN  # EPERM (no CAP_DAC_READ_SEARCH), EOPNOTSUPP, ...
        try:
            s = os.fstat(fd)
            path = None
            if stat.S_ISDIR(s.st_mode):
                # Directories decode connected: /proc gives their path (checked).
                try:
                    path = os.readlink(f"/proc/self/fd/{fd}")
                    if not os.path.samestat(os.lstat(path), s):
                        return _UNKNOWN
                except OSError:
                    return _UNKNOWN
            return _Obj(layer, CompactStat(s), path)
        finally:
            os.close(fd)

    def lower(self, fh: handles.OvlFh) -> object:
        """The lower object (first lower layer whose fs decodes it), _STALE or _UNKNOWN."""
        result: object = _STALE
        seen: set[int] = set()
        for layer in self.ctx.stack.lowers:
            uuid = self.ctx.layer_uuid(layer)
            if fh.uuid != handles.NULL_UUID and uuid != fh.uuid:
                if uuid is None:
                    result = _UNKNOWN  # cannot tell whether it is on this layer
                continue
            if layer.name not in self.devs:
                try:
                    self.devs[layer.name] = os.stat(layer.path).st_dev
                except OSError:
                    self.devs[layer.name] = None
            dev = self.devs[layer.name]
            if dev is None:
                result = _UNKNOWN
                continue
            if dev in seen:
                continue
            seen.add(dev)
            got = self._decode(layer, fh)
            if isinstance(got, _Obj):
                if got.is_dir:
                    # Directories are decoded connected: they must lie in a lower layer.
                    for lay in self.ctx.stack.lowers:
                        if _under(got.path, lay.path) is not None:
                            got.layer = lay
                            return got
                    continue
                return got
            if got == _UNKNOWN:
                result = _UNKNOWN
        return result

    def upper(self, fh: handles.OvlFh) -> object:
        """The upper object an `upper` handle names, _STALE or _UNKNOWN."""
        layer = self.ctx.stack.upper
        uuid = self.ctx.layer_uuid(layer)
        if uuid is None:
            return _UNKNOWN
        if fh.uuid != uuid and fh.uuid != handles.NULL_UUID:
            return "other-fs"
        got = self._decode(layer, fh)
        if isinstance(got, _Obj) and got.is_dir and _under(got.path, layer.path) is None:
            return _STALE  # not acceptable: outside the upper layer
        return got


# --------------------------------------------------------------------------- the walk


def check(ctx: CheckContext, visit: DirVisit) -> None:
    st = _state(ctx)
    if not st.active or visit.hidden:
        return
    members = visit.members
    has_upper = bool(members) and members[0].layer.is_upper
    upper_rel = members[0].relpath if has_upper else None
    if has_upper:
        top = members[0]
        entries = st.entries
        # Only an entry with xattrs can carry an origin (special_items: those, when known).
        for name, entry in special_items(visit.listings[0]):
            if entry.kind is Kind.DIR or entry.is_dir or entry.is_chr_whiteout():
                continue
            rel = join(top.relpath, name)
            key = _fh_key(ctx.xattrs_of(top.layer, rel, entry).get("origin"))
            e = entries.get(key) if key else None
            if e is None:
                continue
            try:
                s = entry.lstat()
            except OSError:
                continue
            if e.kind == "file" and (s.st_dev, s.st_ino) == e.key:
                _add(e, "aliases", rel)
            else:
                _add(e, "claims", rel)
    if st.lower_files:
        wanted = st.lower_files
        inos = st.lower_inos
        chains = visit.chains
        for name in _lower_candidates(visit, inos):
            chain = chains.get(name)
            chain_members = chain.members if chain is not None else None
            if not chain_members:
                continue
            m = chain_members[0]
            entry = m.entry
            if entry.kind is Kind.DIR or m.layer.is_upper or entry.is_dir:
                continue
            if entry.dev is not None and entry.ino is not None and entry.ino not in inos:
                continue  # d_ino stands in for st_ino here (fsio.Entry): not a wanted file
            try:
                s = entry.lstat()
            except OSError:
                continue
            for e in wanted.get((s.st_dev, s.st_ino), ()):
                _add(e, "visible", _Alias(join(visit.path, name), f"{m.layer.name}:{m.relpath}", upper_rel))
    if st.lower_dirs and visit.path:
        # The object the kernel looks the index up by: the top lower directory.
        lower = next((m for m in members if not m.layer.is_upper), None)
        if lower is not None:
            try:
                s = lower.entry.lstat()
            except OSError:
                return
            for e in st.lower_dirs.get((s.st_dev, s.st_ino), ()):
                parent = visit.path.rpartition("/")[0]
                _add(e, "visible", _Alias(visit.path, f"{lower.layer.name}:{lower.relpath}",
                                        _upper_dir_of(ctx, parent), has_upper=has_upper))


def _lower_candidates(visit: DirVisit, inos: set[int]):
    """The names of `visit` whose first entry may be a lower file with an inode number in
    `inos`, in byte order: with the listings' d_ino (fsio.Listing.inos, from the prefetch
    child) only those; else every name."""
    names: list[str] = []
    for member, listing in zip(visit.members, visit.listings):
        if member.layer.is_upper:
            continue
        lino = getattr(listing, "inos", None)
        if lino is None:
            return visit.chains
        if inos.isdisjoint(lino):
            continue
        names.extend(name for name, ino in zip(listing, lino) if ino in inos)
    return sort_names(set(names)) if names else ()


def _upper_dir_of(ctx: CheckContext, merged: str) -> Optional[str]:
    """The upper relpath of merged directory `merged` ('' = root), if it has one."""
    if not merged:
        return ""
    chain = ctx.walker.lookup_merged(merged.split("/"))
    if chain.members and chain.members[0].layer.is_upper and chain.members[0].entry.is_dir:
        return chain.members[0].relpath
    return None


# --------------------------------------------------------------------------- finish


def finish(ctx: CheckContext) -> None:
    _check_names(ctx)
    st = _state(ctx)
    if not st.active:
        return
    decoder = _Decoder(ctx)
    try:
        for name in sorted(st.entries, key=os.fsencode):
            e = st.entries[name]
            if (ctx.stack.work.name, e.rel) in ctx.changed_round:
                continue  # moved or changed by another fix of this round: the next round checks it
            if _moved(ctx, st, e):
                if e.kind == "file" and e.claims and not e.aliases:
                    # What the rename does not mend: the entry is not the inode of the upper
                    # files that carry its origin (a copy split the link). Said now (-n
                    # predicts it); a repair makes it under the new name, next round.
                    _broken(ctx, e, None)
                continue
            if e.kind == "whiteout":
                _check_whiteout(ctx, st, e)
            elif e.kind == "dir":
                if st.nfs:
                    _check_dir(ctx, st, e, decoder)
            else:
                _check_file(ctx, st, e)
    finally:
        decoder.close()


def _check_names(ctx: CheckContext) -> None:
    work = ctx.stack.work
    if work is None:
        return
    index_dir = os.path.join(work.path, "index")
    try:
        names = sorted(os.listdir(index_dir), key=os.fsencode)
    except (FileNotFoundError, NotADirectoryError):
        return
    except OSError as exc:
        ctx.fix(Finding(BY_CODE["OVL901"], work, "index", f"cannot list: {exc.strerror}"))
        return
    for name in names:
        if name.startswith("#"):
            continue  # temporaries: the kernel cleans them at mount
        try:
            handles.decode_index_name(name)
            continue
        except handles.HandleError as exc:
            why, err = str(exc), -22
        except handles.UnknownHandle as exc:
            why, err = str(exc), -61
        rel = f"index/{name}"
        ctx.fix(Finding(
            BY_CODE["OVL601"], work, rel,
            f"{why}; the kernel fails the mount: failed to verify index ({rel}, err={err})",
            ops=(Quarantine(work, rel),), action="move the entry to the quarantine",
        ))


def _quarantine(ctx: CheckContext, code: str, e: _Entry, detail: str, preen: Optional[bool] = None,
                action: str = "move the entry to the quarantine") -> None:
    work = ctx.stack.work
    ctx.fix(Finding(BY_CODE[code], work, e.rel, detail, ops=(Quarantine(work, e.rel),),
                    action=action, preen_ok=preen))


def _ftype(mode: int) -> str:
    return f"{stat.S_IFMT(mode):x}"


def _lower_desc(e: _Entry) -> str:
    if e.visible:
        shown = ", ".join(quoted(a.merged) for a in e.visible[:3])
        more = f" and {len(e.visible) - 3} more" if len(e.visible) > 3 else ""
        return f"lower object {handles.describe_fid(e.fh)}, visible as {shown}{more}"
    return f"lower object {handles.describe_fid(e.fh)}"


def _upper_desc(rels: list[str]) -> str:
    shown = ", ".join(quoted(r) for r in rels[:3])
    return shown + (f" and {len(rels) - 3} more" if len(rels) > 3 else "")


# ------------------------------------------------------------------ copied layers


def _moved(ctx: CheckContext, st: _State, e: _Entry) -> bool:
    """An entry named after a handle of the layers' old location: rename it in place to the
    handle of the object it must now stand for (issue 4). True if reported here."""
    if e.kind == "dir" and not st.nfs:
        return False
    rh = rehandle.get(ctx)
    new = rh.learned(e.fh)
    if new is None:
        mode = None if e.kind == "whiteout" else e.st.st_mode
        if e.lower == _STALE:
            why_stale = "its name names no object of the lower layers (another filesystem's uuid, or gone)"
            new, _why = rh.from_record(e.fh, mode=mode)
        elif rh.moved and isinstance(e.lower, _Obj):
            # A copy within one filesystem: the name still decodes, to the original object;
            # the record (made for the layers at their old paths) says which copy it is now.
            new, _why = rh.from_record(e.fh, mode=mode)
            if new is None or _key_of(new) in (None, e.lower.key):
                return False
            why_stale = "its name decodes to an object outside these layers (the original of a copy)"
        else:
            return False
        if new is None:
            return False
    else:
        why_stale = "its name is the old origin handle of the entry it belongs to"
    new_name = new.fh.index_name()
    if new_name == e.name:
        return False
    work = ctx.stack.work
    ops: list = []
    extra = ""
    if e.kind == "file":
        xa = ctx.xa.read_all(e.path)
        if xa.get("origin") != new.fh.encode():
            ops.append(SetXattr(work, e.rel, ctx.xname("origin"), new.fh.encode()))
            extra = " and set its origin to match"
    elif e.kind == "dir":
        up = _dir_upper(ctx, rh, e, new)
        if up is None:
            return False  # the upper directory is not known: the directory checks decide
        if ctx.xa.read_all(e.path).get("upper") != up.fh.encode():
            ops.append(SetXattr(work, e.rel, ctx.xname("upper"), up.fh.encode()))
            extra = f" and set its upper to {up.describe()}"
    detail = (f"{_kind_label(e)} entry; {why_stale}; it stands for {new.where}, found from "
              f"{new.source}, whose handle is {handles.describe_fid(new.fh)}")
    new_rel = f"index/{new_name}"
    ctx.land(os.path.join(work.path, new_rel))  # a queued rename may be making it
    if os.path.lexists(os.path.join(work.path, new_rel)):
        ctx.fix(Finding(BY_CODE["OVL620"], work, e.rel,
                        detail + f"; an entry of the new name exists already ({new_rel[:22]}...): "
                                 f"left as it is"))
        return True
    ops.append(Rename(work, e.rel, new_rel))
    ctx.fix(Finding(
        BY_CODE["OVL620"], work, e.rel, detail, ops=tuple(ops),
        action=f"rename it in place to index/{new_name[:16]}... (keeps its links){extra}",
        preen_ok=new.source in (rehandle.FROM_RECORD, rehandle.FROM_MERGED_DIR),
        # The checks of the entry itself (its links with the upper aliases, its nlink) are
        # made on it under its new name by the next round. Not needed when it is a file
        # still hard-linked with its upper alias (what the kernel made; a copy that kept
        # hard links): the rename changes nothing else.
        rechecks=not (e.kind == "file" and bool(e.aliases)),
        batch_ok=True,  # hundreds after a copy: group-committed
    ))
    return True


def _kind_label(e: _Entry) -> str:
    return {"whiteout": "whiteout (deleted hardlink)", "dir": "directory"}.get(e.kind, _kind_name(e.st.st_mode))


def _key_of(new: "rehandle.NewHandle") -> Optional[tuple[int, int]]:
    try:
        s = os.lstat(os.path.join(new.layer.path, new.relpath) if new.relpath else new.layer.path)
    except OSError:
        return None
    return (s.st_dev, s.st_ino)


def _dir_upper(ctx: CheckContext, rh: "rehandle.Rehandler", e: _Entry,
               new: "rehandle.NewHandle") -> Optional["rehandle.NewHandle"]:
    """The upper directory a directory entry belongs to, with its handle as it is now."""
    upper = ctx.stack.upper
    if new.upper_rel is not None:
        fh = rh.encode(upper, new.upper_rel, upper=True)
        return None if fh is None else rehandle.NewHandle(fh, upper, new.upper_rel, rehandle.FROM_UPPER)
    raw = ctx.xa.read_all(e.path).get("upper")
    try:
        ufh = handles.decode(raw) if raw else None
    except (handles.HandleError, handles.UnknownHandle):
        ufh = None
    if ufh is None:
        return None
    got, _why = rh.from_record(ufh, upper=True, mode=stat.S_IFDIR)
    return got


# ------------------------------------------------------------------ whiteouts


def _check_whiteout(ctx: CheckContext, st: _State, e: _Entry) -> None:
    low = e.lower
    if low == _STALE:
        ctx.fix(Finding(BY_CODE["OVL608"], ctx.stack.work, e.rel,
                        f"whiteout for {_lower_desc(e)}, which no longer exists"))
        return
    if not isinstance(low, _Obj):
        return
    if low.is_dir and not st.nfs:
        return  # directories consult the index only with nfs_export
    if not e.visible and not e.claims:
        return
    where = [a.merged for a in e.visible] + [f"upper:{c}" for c in e.claims]
    detail = (f"whiteout for {_lower_desc(e)}; reached at {_upper_desc(where)}: every lookup "
              f"there fails with EIO: bad index found (index={e.rel}, ftype=2000, origin "
              f"ftype={_ftype(low.st.st_mode)})")
    upper = ctx.stack.upper
    ops = []
    if not e.claims and all(a.upper_parent is not None and not a.has_upper for a in e.visible):
        targets = sorted({join(a.upper_parent, a.merged.rpartition("/")[2]) for a in e.visible},
                         key=os.fsencode)
        if all(not os.path.lexists(os.path.join(upper.path, t)) for t in targets):
            ops = [MakeWhiteout(upper, t) for t in targets]
    if ops:
        action = "create the whiteout again at " + ", ".join(f"upper:{quoted(o.relpath)}" for o in ops)
        ctx.fix(Finding(BY_CODE["OVL612"], ctx.stack.work, e.rel,
                        detail + "; the index records that it was deleted",
                        ops=tuple(ops), action=action))
    else:
        _quarantine(ctx, "OVL612", e, detail + "; it cannot be hidden again from here",
                    action="move the index whiteout to the quarantine (the object is shown)")


# ------------------------------------------------------------------ directories


def _check_dir(ctx: CheckContext, st: _State, e: _Entry, decoder: _Decoder) -> None:
    xa = ctx.xa.read_all(e.path)
    raw = xa.get("upper")
    why = None
    if not raw:
        why = "has no upper xattr" if raw is None else "has an empty upper xattr"
    else:
        try:
            ufh = handles.decode(raw)
        except handles.HandleError as exc:
            why = f"has a malformed upper xattr ({exc}; the kernel logs invalid origin)"
        except handles.UnknownHandle as exc:
            why = f"has an upper xattr of {exc}"
    if why is None:
        up = decoder.upper(ufh)
        if up == "other-fs":
            why = "has an upper xattr for another filesystem (uuid)"
    if why is not None:
        _quarantine(ctx, "OVL609", e,
                    f"directory entry {why}; the kernel removes it at mount: failed to verify "
                    f"index ({e.rel}, ftype=4000, err=-116)")
        return
    if up == _UNKNOWN:
        return
    if up == _STALE:
        vis = [a for a in e.visible]
        tail = (f"; {quoted(vis[0].merged)} would then fail with EIO (bad index found)"
                if vis else "")
        _quarantine(ctx, "OVL611", e,
                    f"the upper directory its upper xattr names is gone; with nfs_export the "
                    f"kernel turns the entry into a whiteout at mount: orphan index entry "
                    f"({e.rel}, ftype=4000, nlink=2){tail}")
        return
    assert isinstance(up, _Obj)
    urel = _under(up.path or "", ctx.stack.upper.path) if up.is_dir else None
    if not up.is_dir:
        _quarantine(ctx, "OVL610", e,
                    f"its upper xattr names a {_kind_name(up.st.st_mode)}; the mount fails: "
                    f"invalid index upper ({e.rel}, upper=...), err=-5")
        return
    origin = ctx.xa.read_all(up.path).get("origin")
    shown = f"upper:{quoted(urel or '.')}"
    if not _usable_origin(origin):
        _quarantine(ctx, "OVL603", e,
                    f"the upper directory {shown} it names has no usable origin; the mount "
                    f"fails: failed to verify index ({e.rel}, ftype=4000, err=-61)")
        return
    if not _same_fh(origin, bytes.fromhex(e.name)):
        _quarantine(ctx, "OVL602", e,
                    f"the origin of the upper directory {shown} it names is another object "
                    f"({handles.describe_fid(handles.decode(origin))}); the kernel removes "
                    f"the entry at mount: failed to verify index ({e.rel}, ftype=4000, err=-116)")
        return
    if e.lower == _STALE:
        ctx.fix(Finding(BY_CODE["OVL608"], ctx.stack.work, e.rel,
                        f"directory entry of {shown} for {_lower_desc(e)}, which no longer exists"))
    elif isinstance(e.lower, _Obj) and not e.lower.is_dir:
        ctx.fix(Finding(BY_CODE["OVL613"], ctx.stack.work, e.rel,
                        f"a directory entry, but its name encodes a "
                        f"{_kind_name(e.lower.st.st_mode)} ({_lower_desc(e)})"))


def _kind_name(mode: int) -> str:
    return {stat.S_IFDIR: "directory", stat.S_IFREG: "regular file", stat.S_IFLNK: "symlink",
            stat.S_IFCHR: "character device", stat.S_IFBLK: "block device",
            stat.S_IFIFO: "fifo", stat.S_IFSOCK: "socket"}.get(stat.S_IFMT(mode), "special file")


def _usable_origin(raw: Optional[bytes]) -> bool:
    """What ovl_get_fh returns a handle for (missing, empty, invalid, unknown: no)."""
    if not raw:
        return False
    try:
        handles.decode(raw)
    except (handles.HandleError, handles.UnknownHandle):
        return False
    return True


# ------------------------------------------------------------------ files


def _check_file(ctx: CheckContext, st: _State, e: _Entry) -> None:
    work = ctx.stack.work
    xa = ctx.xa.read_all(e.path)
    origin = xa.get("origin")
    name_fh = bytes.fromhex(e.name)
    low = e.lower
    kind = _kind_name(e.st.st_mode)
    if not _usable_origin(origin):
        what = "no" if origin is None else ("an empty" if not origin else "an unusable")
        detail = (f"{kind} entry with {what} origin xattr; the mount fails: failed to verify "
                  f"index ({e.rel}, ftype={_ftype(e.st.st_mode)}, err=-61)")
        if isinstance(low, _Obj) and stat.S_IFMT(low.st.st_mode) == stat.S_IFMT(e.st.st_mode):
            ctx.fix(Finding(BY_CODE["OVL603"], work, e.rel, detail,
                            ops=(SetXattr(work, e.rel, ctx.xname("origin"), name_fh[: name_fh[2]]),),
                            action="restore origin from the entry name"))
        else:
            has_alias = e.st.st_nlink > 1
            _quarantine(ctx, "OVL603", e, detail + ("" if has_alias else
                        "; it has no other link: the data lives only here"), preen=has_alias)
        return
    if not _same_fh(origin, name_fh):
        other = handles.describe_fid(handles.decode(origin))
        _quarantine(ctx, "OVL602", e,
                    f"its origin is another object ({other}); the kernel removes it at mount: "
                    f"failed to verify index ({e.rel}, ftype={_ftype(e.st.st_mode)}, err=-116)")
        return
    if low == _UNKNOWN or low is None:
        if e.claims and not e.aliases:
            _broken(ctx, e, None)
        return
    wrong_type = isinstance(low, _Obj) and stat.S_IFMT(low.st.st_mode) != stat.S_IFMT(e.st.st_mode)
    if low == _STALE or wrong_type:
        if e.st.st_nlink == 1:
            why = (f"its name encodes a {_kind_name(low.st.st_mode)}" if wrong_type
                   else "the lower object its name encodes no longer exists")
            _quarantine(ctx, "OVL607", e,
                        f"{kind} entry with no other link; {why}; the kernel removes it at "
                        f"mount: failed to verify index ({e.rel}, ftype={_ftype(e.st.st_mode)}, "
                        f"err=-116)")
        elif wrong_type:
            ctx.fix(Finding(BY_CODE["OVL613"], work, e.rel,
                            f"{kind} entry, but its name encodes a {_kind_name(low.st.st_mode)} "
                            f"({_lower_desc(e)})"))
        else:
            ctx.fix(Finding(BY_CODE["OVL608"], work, e.rel,
                            f"{kind} entry (upper {_upper_desc(e.aliases) or 'links elsewhere'}) "
                            f"for a lower object that no longer exists"))
        return
    assert isinstance(low, _Obj)
    if e.claims and not e.aliases:
        _broken(ctx, e, low)
        return
    if not e.aliases:
        if e.st.st_nlink > 1 and not e.wanted:
            return  # linked elsewhere; whether it is visible was not looked for
        _check_unaliased(ctx, st, e, low, xa)
        return
    _check_nlink(ctx, e, low, xa)


def _broken(ctx: CheckContext, e: _Entry, low: Optional[_Obj]) -> None:
    """Upper files carry the entry's origin but none is the entry's inode (G6)."""
    visible = bool(e.visible) if e.wanted else None
    detail = (f"upper {_upper_desc(e.claims)} carries this origin but is another inode than "
              f"the entry (hardlink broken, e.g. by copying upper and work separately)")
    if e.st.st_nlink == 1 and low is not None and low.st.st_nlink == 1:
        detail += ("; at mount the entry is an orphan: removed, or with nfs_export whited out, "
                   "after which lookups of the upper file fail with EIO (bad index found)")
    elif visible:
        detail += (f"; the entry's separate copy is what {_lower_desc(e)} shows; after the fix "
                   f"they show their lower content")
    relink = _relink_ops(ctx, e)
    if relink is not None:
        ops, alias = relink
        ctx.fix(Finding(
            BY_CODE["OVL604"], ctx.stack.work, e.rel,
            detail + f"; the entry is an identical copy of upper {quoted(alias)}",
            ops=ops, preen_ok=True,
            action=f"move the separate index copy to the quarantine and hard-link upper "
                   f"{quoted(alias)} in its place (the link the kernel made)",
        ))
        return
    _quarantine(ctx, "OVL604", e, detail, preen=(visible is False),
                action="move the separate index copy to the quarantine (the upper file keeps the data)")


def _relink_ops(ctx: CheckContext, e: _Entry) -> Optional[tuple[tuple, str]]:
    """When the entry is an identical copy of its (single) upper inode: the ops that put the
    upper<->index hard link back (a copy tool split it: tar does so for fifos and devices,
    separate copies of upper and work for everything)."""
    upper = ctx.stack.upper
    stats = {}
    for rel in e.claims:
        try:
            s = os.lstat(os.path.join(upper.path, rel))
        except OSError:
            return None
        stats[(s.st_dev, s.st_ino)] = (rel, s)
    if len(stats) != 1:
        return None
    rel, s = next(iter(stats.values()))
    if s.st_dev != e.st.st_dev or not _same_content(os.path.join(upper.path, rel), s, e.path, e.st):
        return None
    ops: list = []
    mine = ctx.xa.read_all(e.path)
    theirs = ctx.xa.read_all(os.path.join(upper.path, rel))
    for key, value in sorted(mine.items()):
        if key not in theirs:
            ops.append(SetXattr(upper, rel, ctx.xname(key), value))
        elif theirs[key] != value and key != "nlink":
            return None  # the copies disagree on overlay state: not ours to pick
    work = ctx.stack.work
    ops += [Quarantine(work, e.rel), Link(work, e.rel, upper, rel)]
    return tuple(ops), rel


def _same_content(a: str, sa: "os.stat_result | CompactStat", b: str,
                  sb: "os.stat_result | CompactStat") -> bool:
    """Same type, mode, owner and content (data, symlink target or device number)."""
    if (sa.st_mode, sa.st_uid, sa.st_gid) != (sb.st_mode, sb.st_uid, sb.st_gid):
        return False
    return same_data(a, sa, b, sb)


def _computed_nlink(e: _Entry, low: _Obj, raw: Optional[bytes]) -> Optional[int]:
    """ovl_get_nlink's result (None: it fails and falls back)."""
    parsed = parse_nlink(raw)
    if parsed is None:
        return None
    base = e.st.st_nlink if parsed[0] == "U" else low.st.st_nlink
    n = base + parsed[1]
    return n if n > 0 else None


def _check_unaliased(ctx: CheckContext, st: _State, e: _Entry, low: _Obj, xa: dict) -> None:
    """No upper alias: visible lower aliases resurrect the entry (H7); otherwise it is an
    orphan the kernel removes, or data nobody can reach."""
    kind = _kind_name(e.st.st_mode)
    if e.st.st_nlink == 1:
        orphan = low.st.st_nlink == 1 or _computed_nlink(e, low, xa.get("nlink")) is None
    else:
        orphan = False  # other links: the kernel does not check it
    if e.visible:
        if not orphan:
            _check_nlink(ctx, e, low, xa)
            return
        # Only a lower object with one link gets here (otherwise the nlink checks decide).
        if low.st.st_nlink > 1:
            _check_nlink(ctx, e, low, xa)
            return
        names = ", ".join(quoted(a.merged) for a in e.visible)
        eio = (f"with nfs_export whited out, after which {names} fails with EIO (bad index found)"
               if st.nfs else "so " + names + " loses the copied-up content")
        _quarantine(ctx, "OVL605", e,
                    f"{kind} entry without upper alias for {names} (its upper alias was removed "
                    f"offline?); the entry holds the only copy of the copied-up data; at mount "
                    f"the kernel removes it (orphan index entry ({e.rel}, ftype="
                    f"{_ftype(e.st.st_mode)}, nlink=1)), {eio}",
                    preen=False,
                    action=f"move the entry to the quarantine (kept; {names} then shows its lower content)")
        return
    fate = ("the kernel removes it at the next mount: orphan index entry" if orphan
            else "the kernel keeps it but never shows it")
    _quarantine(ctx, "OVL606", e,
                f"{kind} entry with no upper alias and no visible lower alias ({_lower_desc(e)}, "
                f"{low.st.st_nlink} link(s)); its copied-up data cannot be reached; {fate}",
                preen=False, action="move the entry to the quarantine (its data is kept there)")


def _check_nlink(ctx: CheckContext, e: _Entry, low: _Obj, xa: dict) -> None:
    if low.st.st_nlink <= 1 or not e.wanted:
        return  # ovl_get_nlink does not read the xattr then
    work = ctx.stack.work
    expected = len(e.aliases) + len(e.visible)
    if expected == 0:
        return
    raw = xa.get("nlink")
    value = f"U{expected - e.st.st_nlink:+d}".encode()
    op = SetXattr(work, e.rel, ctx.xname("nlink"), value)
    counted = (f"{len(e.aliases)} upper alias(es)"
               + (f" ({_upper_desc(e.aliases)})" if e.aliases else "")
               + f" + {len(e.visible)} visible lower alias(es)"
               + (f" ({', '.join(quoted(a.merged) for a in e.visible[:3])})" if e.visible else ""))
    if parse_nlink(raw) is None:
        shown = "missing" if raw is None else repr(raw)[1:]
        ctx.fix(Finding(BY_CODE["OVL614"], work, e.rel,
                        f"nlink {shown}; the kernel logs failed to get index nlink and uses the "
                        f"real link count; counted: {counted}",
                        ops=(op,), action=f"set nlink={value.decode()}"))
        return
    computed = _computed_nlink(e, low, raw)
    if computed is None or computed < expected:
        shown = "<= 0" if computed is None else str(computed)
        ctx.fix(Finding(BY_CODE["OVL615"], work, e.rel,
                        f"nlink {raw.decode(errors='replace')!r} gives {shown}, but the merged view "
                        f"has {expected}: {counted}",
                        ops=(op,), action=f"set nlink={value.decode()}"))
