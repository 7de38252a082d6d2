"""Origin file handles: format, file type, staleness; merged directories whose origin does not verify; the upper-root origin, the index dir's upper and the uuid xattr.

What the kernel does with an `origin` (overlay-format.md §3, §4.3, §9.1a, §9.2):

- non-directories of the upper layer: the handle is decoded on the lower layer whose
  filesystem uuid it carries; the object found gives st_ino (and, with the index, the
  index key). Invalid values are logged and ignored, unknown/stale ones silently ignored, a
  wrong file type is logged and ignored;
- directories: never decoded; with nfs_export the stored bytes must equal the handle of
  the lower directory found by name (or redirect), else the directory is not merged;
- the upper root (index in use): must equal the handle of the top lower root, else the mount
  fails; `work/index`'s `upper` must equal the upper root's handle (flag 0x04);
- lower layers: never read (former uppers keep theirs; checked against the layers beneath,
  reported as warnings).

Evidence comes from `name_to_handle_at` (what the kernel would store now) and
`open_by_handle_at` (what a stored handle decodes to). Non-directories renamed after copy-up
keep an origin to their old path: such a handle is fine as long as it decodes to an object of
the right type inside the lower layers that the overlay does not show elsewhere.
"""
from __future__ import annotations

import os
import stat
from dataclasses import dataclass, field
from typing import NamedTuple, Optional

from ovlfsck import elimination, handles, rehandle
from ovlfsck.engine import CheckContext, Finding
from ovlfsck.fsio import Entry, quoted, special_items, walk_tree
from ovlfsck.problems import BY_CODE
from ovlfsck.repair import Quarantine, RemoveXattr, SetXattr
from ovlfsck.stack import Layer, Role
from ovlfsck.walk import DirVisit, Member, add_one_or_more, join

NULL = handles.NULL_UUID


# =========================================================================== state


@dataclass
class _Pending:
    """A non-directory whose origin decoded to an object whose place is not known yet."""

    layer: Layer
    relpath: str
    entry: Entry
    fh: handles.OvlFh
    decoded: handles.Decoded
    indexed: bool
    lower: Optional[Member] = None  # the candidate beneath: see `source`
    metacopy: bool = False
    source: str = rehandle.FROM_PATH  # FROM_DATA: where its data lookup or redirect leads


@dataclass(slots=True)
class _Claim:
    relpath: str
    upper_key: tuple[int, int]  # (st_dev, st_ino) of the upper file
    at_own_path: bool  # the origin is the object at the same path beneath
    indexed: bool


@dataclass
class _State:
    walker: object
    index_in_use: bool = False
    nfs_in_use: bool = False
    verified: int = 0
    stale: int = 0
    null_verified: int = 0  # verified only with a null uuid on a filesystem that has one
    real_verified: int = 0
    null_example: Optional[str] = None
    pending: list[_Pending] = field(default_factory=list)
    # origin (uuid + fid_type + fid) -> (relpath, st_dev, st_ino, at_own_path, indexed), or a
    # list of those when several upper entries carry that origin
    claims: dict[bytes, object] = field(default_factory=dict)
    root_dev: dict[str, int] = field(default_factory=dict)
    undecodable: Optional[str] = None  # why open_by_handle_at could not be used
    moved: list["_Moved"] = field(default_factory=list)  # indexed files to rehandle after the walk
    orig_root: Optional[str] = ""  # "": not looked for; None: unknown (see _original_root)
    rh: Optional[rehandle.Rehandler] = None


class _Cand(NamedTuple):
    """A lower object an indexed file's stale origin may now name."""

    layer: Layer
    relpath: str
    host: str
    key: tuple[int, int]  # (st_dev, st_ino)
    mode: int
    exact: bool  # certain (the copy of the original the origin names, or the data lookup)
    source: str  # rehandle.FROM_*


@dataclass(slots=True)
class _Moved:
    """An indexed upper file whose origin is a handle of the layers' old location: resolved
    after the walk, when all its aliases are known."""

    relpath: str
    upper_key: tuple[int, int]
    fh: handles.OvlFh
    mode: int
    detail: str
    cand: Optional[_Cand]  # the lower object at its own path, or (exact) the copy of the
    # original its origin names, or the lower file its data lookup or redirect leads to


def _state(ctx: CheckContext) -> _State:
    def build() -> _State:
        st = _State(ctx.walker)
        st.index_in_use, st.nfs_in_use = _index_features(ctx)
        st.rh = rehandle.get(ctx, lambda lay: _encode_uuid(ctx, st, lay))
        return st

    return ctx.round_state("origins", build)


def _index_dir(ctx: CheckContext) -> Optional[str]:
    work = ctx.stack.work
    if work is None:
        return None
    path = os.path.join(work.path, "index")
    return path if os.path.isdir(path) and not os.path.islink(path) else None


def _index_features(ctx: CheckContext) -> tuple[bool, bool]:
    """(index in use, nfs_export in use): the -o hints, else what work/index shows."""
    f = ctx.stack.features
    if ctx.stack.upper is None:
        return False, False
    index_dir = _index_dir(ctx)
    if f.nfs_export:
        return True, True
    index = f.index if f.index is not None else index_dir is not None
    if not index:
        return False, False
    if f.nfs_export is not None:
        return True, bool(f.nfs_export)
    nfs = False
    if index_dir is not None:
        # Directory index entries (and whiteout index entries) are made only with nfs_export.
        try:
            with os.scandir(index_dir) as it:
                for de in it:
                    if de.name.startswith("#"):
                        continue
                    if de.is_dir(follow_symlinks=False):
                        nfs = True
                        break
        except OSError:
            pass
    return True, nfs


# =========================================================================== uuids and encoding


def _uuids(ctx: CheckContext, layer: Layer) -> list[Optional[bytes]]:
    """The uuids a handle of an object on `layer` may carry, most likely first. None: the
    filesystem's uuid cannot be had (any uuid may be its)."""
    hint = ctx.stack.features.uuid
    if hint == "off":
        return [NULL]
    fs = ctx.layer_uuid(layer)
    if fs is None:
        return [None]
    if hint is None and fs != NULL:
        return [fs, NULL]  # layers used with uuid=off carry null uuids
    return [fs]


def _uuid_ok(ctx: CheckContext, layer: Layer, uuid: bytes) -> bool:
    return any(u is None or u == uuid for u in _uuids(ctx, layer))


def _encode_uuid(ctx: CheckContext, st: _State, layer: Layer) -> Optional[bytes]:
    """The uuid a re-encoded handle for `layer` gets: the filesystem's, or null when the
    stack is (evidently) used with uuid=off."""
    opts = _uuids(ctx, layer)
    if opts == [None]:
        return None
    if len(opts) > 1 and st.null_verified > st.real_verified:
        return NULL
    return opts[0]


def encode_origin(ctx: CheckContext, layer: Layer, host_path: str, uuid: Optional[bytes] = None,
                  upper: bool = False) -> Optional[handles.OvlFh]:
    """The handle the kernel would store for the object at `host_path` on `layer` (reusable:
    a re-encode from a path and its layer). None if it cannot be made."""
    if uuid is None:
        opts = _uuids(ctx, layer)
        if opts == [None]:
            return None
        uuid = opts[0]
    try:
        return handles.encode_for(host_path, uuid, upper=upper)
    except OSError:
        return None


def _matches(ctx: CheckContext, st: _State, layer: Layer, host_path: str, fh: handles.OvlFh,
             exact: bool, upper: bool = False) -> Optional[bool]:
    """Does `fh` encode the object at `host_path`? exact: byte for byte (the kernel's
    memcmp, flags included), else the same object (what a decode would find). None: cannot
    be told."""
    try:
        fid_type, fid = handles.name_to_handle(host_path)
    except OSError:
        return None
    if (fid_type, fid) != (fh.fid_type, fh.fid):
        return False
    if exact:
        flags = handles.CPU_ENDIAN_FLAG | (handles.FLAG_PATH_UPPER if upper else 0)
        if fh.flags != flags or fh.version != handles.OVL_FH_VERSION:
            return False
    opts = _uuids(ctx, layer)
    if fh.uuid in opts or None in opts:
        if fh.uuid == NULL and opts[0] not in (NULL, None):
            st.null_verified += 1
            st.null_example = st.null_example or f"{layer.name}:{host_path}"
        else:
            st.real_verified += 1
        return True
    return False


# =========================================================================== decoding


@dataclass
class _Resolution:
    kind: str  # 'nouuid' | 'gone' | 'found' | 'unknown'
    detail: str
    decoded: Optional[handles.Decoded] = None
    layer: Optional[Layer] = None  # the layer whose filesystem decoded it
    where: Optional[tuple[Layer, str]] = None  # (lower layer, relpath) if known to be inside


def _layer_dev(st: _State, layer: Layer) -> Optional[int]:
    if layer.name not in st.root_dev:
        try:
            st.root_dev[layer.name] = os.stat(layer.path).st_dev
        except OSError:
            st.root_dev[layer.name] = -1
    dev = st.root_dev[layer.name]
    return None if dev < 0 else dev


def _lowers_beneath(ctx: CheckContext, layer: Layer) -> list[Layer]:
    """The lower layers an origin of an object on `layer` may name (data layers never)."""
    return [lay for lay in ctx.stack.lowers if lay.depth > layer.depth]


def _resolve(ctx: CheckContext, st: _State, layer: Layer, fh: handles.OvlFh) -> _Resolution:
    """What the kernel's decode of `fh` gives for an entry of `layer`."""
    cands = [lay for lay in _lowers_beneath(ctx, layer) if _uuid_ok(ctx, lay, fh.uuid)]
    if not cands:
        names = ", ".join(
            f"{lay.name}: {handles.format_uuid(u) if u is not None else '(unknown)'}"
            for lay in _lowers_beneath(ctx, layer) for u in _uuids(ctx, lay)[:1]
        )
        why = f"the handle's uuid {handles.format_uuid(fh.uuid)} is that of no lower layer's filesystem ({names})"
        if fh.uuid == NULL:
            why += "; a null uuid is written with uuid=off"
        return _Resolution("nouuid", why)
    seen: set[int] = set()
    for lay in cands:
        dev = _layer_dev(st, lay)
        if dev in seen:
            continue
        seen.add(dev)
        try:
            dec = handles.decode_on(lay.path, fh)
        except handles.HandleDecodeUnsupported as exc:
            st.undecodable = st.undecodable or str(exc)
            return _Resolution("unknown", str(exc))
        if dec is None:
            continue
        res = _Resolution("found", "", dec, lay)
        if dec.path is not None:
            res.where = _place(ctx, dec.path)
        return res
    return _Resolution(
        "gone",
        f"the handle names {handles.describe_fid(fh)} on the filesystem of {cands[0].name}, which "
        f"does not exist any more",
    )


def _place(ctx: CheckContext, host_path: str) -> Optional[tuple[Layer, str]]:
    """(lower layer, relpath) of a host path inside a lower layer, else None."""
    for lay in ctx.stack.lowers:
        root = lay.path.rstrip("/")
        if host_path == root:
            return lay, ""
        if host_path.startswith(root + "/"):
            return lay, host_path[len(root) + 1:]
    return None


def _type_name(mode: int) -> str:
    return {
        stat.S_IFDIR: "a directory", stat.S_IFREG: "a regular file", stat.S_IFLNK: "a symlink",
        stat.S_IFCHR: "a character device", stat.S_IFBLK: "a block device",
        stat.S_IFIFO: "a fifo", stat.S_IFSOCK: "a socket",
    }.get(stat.S_IFMT(mode), "an object of unknown type")


def _shown_where(res: _Resolution) -> str:
    if res.where is not None:
        lay, rel = res.where
        return f"{lay.name}:{quoted(rel) if rel else '(root)'}"
    if res.decoded is not None and res.decoded.path is not None:
        return quoted(res.decoded.path)
    return "an object"


# =========================================================================== the walk


# walk.DirVisit.quiet: nothing for this pass (origins are on special entries, and a lower
# directory without xattrs is not impure).
QUIET_SKIP = True


def check(ctx: CheckContext, visit: DirVisit) -> None:
    st = _state(ctx)
    for i, member in enumerate(visit.members):
        layer = member.layer
        if layer.role is not Role.UPPER and ctx.walker.is_lowermost(layer):
            continue  # nothing beneath to check against
        if layer.is_upper:
            parent_impure = True  # the upper is read completely (impure is checked there)
        else:
            parent_impure = ctx.xattrs_of(layer, member.relpath, member.entry).get("impure") == b"y"
        # Only entries with overlay xattrs can have an origin (special_items: those, when the
        # listing knows them; every entry otherwise).
        for name, entry in special_items(visit.listings[i]):
            if entry.is_chr_whiteout():
                continue
            is_dir = entry.is_dir
            if not is_dir and not parent_impure:
                # A directory holding an entry with an origin is impure (the kernel sets it
                # before the copy-up); lower files elsewhere are not read.
                continue
            relpath = join(member.relpath, name)
            raw = ctx.xattrs_of(layer, relpath, entry).get("origin")
            if not raw:
                continue  # none, or empty: copied up with the origin unknown
            _check_entry(ctx, st, visit, i, name, entry, relpath, raw)


def _beneath(ctx: CheckContext, visit: DirVisit, i: int, name: str, entry: Entry) -> Optional[Member]:
    """For a directory: the lower directory it merges with (its chain's next member,
    redirects followed). For a non-directory: the object at the same path beneath."""
    if entry.is_dir:
        chain = visit.chains.get(name)
        if chain is not None:
            for k, m in enumerate(chain.members):
                if m.entry is entry:
                    return chain.members[k + 1] if k + 1 < len(chain.members) else None
        chain = ctx.walker.resolve(name, visit.members[i:], visit.listings[i:], visit.path,
                                   visit.straight, register=False)
        if chain.members and chain.members[0].entry is entry and len(chain.members) > 1:
            return chain.members[1]
        return None
    if i + 1 >= len(visit.members):
        return None
    chain = ctx.walker.resolve(name, visit.members[i + 1:], visit.listings[i + 1:], visit.path,
                               visit.straight, register=False)
    return chain.members[0] if chain.members else None


def _data_lower(ctx: CheckContext, visit: DirVisit, i: int, layer: Layer, relpath: str,
                entry: Entry) -> Optional[Member]:
    """The lower file the data lookup of a metacopy file meets first (its path, or its
    redirect). With index=on the kernel verifies the origin against exactly this file
    (ESTALE otherwise), so it is the one object a rewritten origin can name. For a plain
    file with a redirect (renamed while a metacopy file), where the redirect leads."""
    from ovlfsck.passes.metacopy import Node, Resolver  # the metacopy pass owns the lookup

    below = list(zip(visit.members[i + 1:], visit.listings[i + 1:]))
    if not below:
        return None
    res = Resolver(ctx).resolve(Node(layer, relpath, entry), below)
    found = res.first_lower
    if found is None:
        return None
    return Member(found.layer, found.relpath, found.entry)


def _check_entry(ctx: CheckContext, st: _State, visit: DirVisit, i: int, name: str,
                 entry: Entry, relpath: str, raw: bytes) -> None:
    layer = visit.members[i].layer
    upper = layer.is_upper
    is_dir = entry.is_dir
    lower = _beneath(ctx, visit, i, name, entry)
    lower_dir = lower if (is_dir and lower is not None and lower.entry.is_dir) else None
    try:
        fh = handles.decode(raw)
    except (handles.HandleError, handles.UnknownHandle) as exc:
        malformed = isinstance(exc, handles.HandleError)
        what = "not a valid file handle" if malformed else "a handle the kernel cannot use"
        detail = f"origin {_hex(raw)}: {what} ({exc})"
        if not upper:
            pass
        elif is_dir:
            detail += ("; with nfs_export the kernel does not merge the directory (and fails the "
                       "mount if the directory has an index entry)"
                       if lower_dir is not None and st.nfs_in_use else
                       "; read only with nfs_export, which would not merge the directory")
        elif malformed:
            detail += f"; the kernel ignores it and logs invalid origin ({raw[:5].hex()}...) at every lookup"
        else:
            detail += "; the kernel ignores it silently (st_ino is the upper inode's)"
        _repair(ctx, st, "OVL501" if malformed else "OVL502", layer, relpath, entry, lower_dir,
                detail, preen=True)
        return
    if is_dir and lower_dir is not None:
        _check_merged_dir(ctx, st, layer, relpath, entry, fh, lower_dir)
        return
    xattrs = ctx.xattrs_of(layer, relpath, entry)
    indexed = upper and st.index_in_use and "nlink" in xattrs
    # A metacopy file's lower is found by path or redirect, and its origin is verified
    # against that (with the index) by the metacopy pass; here only its type is judged.
    metacopy = not is_dir and "metacopy" in xattrs
    if not is_dir and lower is not None and not metacopy:
        ok = _matches(ctx, st, lower.layer, lower.entry.path, fh, exact=False)
        if ok:
            st.verified += 1
            if upper:
                _claim(st, fh, relpath, entry, True, indexed)
            return
    res = _resolve(ctx, st, layer, fh)
    # A metacopy file's data is the lower file its path (or redirect) leads to. A regular file
    # with a redirect was renamed while it was a metacopy file (the redirect stays when its
    # data is copied up later): the object at its own path is another file, not its origin.
    redirected = not is_dir and "redirect" in xattrs
    data_lower = (_data_lower(ctx, visit, i, layer, relpath, entry)
                  if metacopy or redirected else None)
    if metacopy and res.kind in ("nouuid", "gone") and upper:
        st.stale += 1
        # A handle that is gone: only the record can tell (no candidate from the paths).
        _rehandle(ctx, st, layer, relpath, entry, fh, indexed, res.detail,
                  data_lower if res.kind == "nouuid" else None, source=rehandle.FROM_DATA)
        return  # not rewritten: the metacopy pass reports the origin that does not verify
    if res.kind == "unknown" or (metacopy and res.kind != "found"):
        return
    if res.kind in ("nouuid", "gone"):
        st.stale += 1
        # A handle for another filesystem: the layers were copied, and the object at the
        # same path beneath is a candidate. A handle that is gone: only the record can tell.
        cand, source = (data_lower, rehandle.FROM_DATA) if redirected else (lower, rehandle.FROM_PATH)
        done, why = _rehandle(ctx, st, layer, relpath, entry, fh, indexed, res.detail,
                              cand if res.kind == "nouuid" else None, source=source)
        if not done:
            _stale(ctx, layer, relpath, entry, indexed, res.detail, is_dir, fh, why)
        return
    dec = res.decoded
    assert dec is not None
    try:
        mode = entry.lstat().st_mode
    except OSError:
        return
    if stat.S_IFMT(dec.st.st_mode) != stat.S_IFMT(mode):
        st.stale += 1
        detail = (f"origin decodes to {_type_name(dec.st.st_mode)} ({_shown_where(res)}), but this is "
                  f"{_type_name(mode)}: invalid origin ({relpath}, ftype={stat.S_IFMT(mode):x}, "
                  f"origin ftype={stat.S_IFMT(dec.st.st_mode):x})")
        if upper:
            _remove(ctx, "OVL503", layer, relpath, detail, preen=True,
                    why="the kernel ignores it and logs a warning at every lookup",
                    fh=fh if is_dir else None)
        else:
            _remove(ctx, "OVL510", layer, relpath, detail, preen=False)
        return
    if metacopy:
        if res.where is None and upper:
            # Decodes outside the layers, or where is not known yet: after the walk.
            st.pending.append(_Pending(layer, relpath, entry, fh, dec, indexed, data_lower, True,
                                       rehandle.FROM_DATA))
        return
    if is_dir:
        # A directory that merges with nothing: its origin is never used. Only an origin
        # outside the layers is worth a word.
        if res.where is not None and res.where[0].depth > layer.depth:
            st.verified += 1
            return
        st.stale += 1
        _outside(ctx, layer, relpath, indexed, f"origin names the directory {_shown_where(res)}, "
                 f"which is not in a lower layer beneath {layer.name}", is_dir, fh)
        return
    if lower is not None and (lower.entry.lstat().st_dev, lower.entry.lstat().st_ino) == dec.key:
        st.verified += 1
        if upper:
            _claim(st, fh, relpath, entry, True, indexed)
        return
    if upper:
        _claim(st, fh, relpath, entry, False, indexed)
    if redirected:
        st.pending.append(_Pending(layer, relpath, entry, fh, dec, indexed, data_lower,
                                   source=rehandle.FROM_DATA))
    else:
        st.pending.append(_Pending(layer, relpath, entry, fh, dec, indexed, lower))


def _claim(st: _State, fh: handles.OvlFh, relpath: str, entry: Entry, own: bool, indexed: bool) -> None:
    try:
        s = entry.lstat()
    except OSError:
        return
    # Kept for every upper entry with an origin until the end of the walk: compact (one
    # bytes key, one tuple; a list only for an origin claimed more than once).
    key = fh.uuid + bytes((fh.fid_type,)) + fh.fid
    add_one_or_more(st.claims, key, (relpath, s.st_dev, s.st_ino, own, indexed))


def _pd2(host_path: str) -> str:
    """The kernel's %pd2: parent and name."""
    head, name = os.path.split(host_path.rstrip("/"))
    return f"{os.path.basename(head)}/{name}"


def _ino(entry: Entry) -> str:
    try:
        return str(entry.lstat().st_ino)
    except OSError:
        return "?"


def _hex(raw: bytes) -> str:
    return raw.hex() if len(raw) <= 40 else raw[:40].hex() + "..."


# =========================================================================== findings


def _repair(ctx: CheckContext, st: _State, code: str, layer: Layer, relpath: str, entry: Entry,
            lower_dir: Optional[Member], detail: str, preen: bool) -> None:
    """A bad value: re-encode from the merged lower directory, else remove it."""
    upper = layer.is_upper
    new = None
    if lower_dir is not None:
        new = encode_origin(ctx, lower_dir.layer, lower_dir.entry.path, _encode_uuid(ctx, st, lower_dir.layer))
    if not upper:
        detail += "; the kernel never reads origins of lower layers"
        code = "OVL510"
    if new is not None:
        ops = (SetXattr(layer, relpath, ctx.xname("origin"), new.encode()),)
        action = f"set origin to the handle of {lower_dir.layer.name}:{quoted(lower_dir.relpath)} ({handles.describe_fid(new)})"
    else:
        ops = (RemoveXattr(layer, relpath, ctx.xname("origin")),)
        action = "remove the origin xattr"
        if entry.is_dir and lower_dir is not None:
            action += " (the kernel re-adds the right one at the next lookup of the merged directory)"
    ctx.fix(Finding(BY_CODE[code], layer, relpath, detail, ops=ops, action=action, preen_ok=preen))


def _index_names(ctx: CheckContext, fh: Optional[handles.OvlFh]) -> bool:
    """Does work/index hold an entry named after `fh`?"""
    index_dir = _index_dir(ctx)
    if fh is None or index_dir is None:
        return False
    return os.path.lexists(os.path.join(index_dir, fh.index_name()))


def _remove(ctx: CheckContext, code: str, layer: Layer, relpath: str, detail: str, preen: bool,
            why: str = "", fh: Optional[handles.OvlFh] = None) -> None:
    if not layer.is_upper and code != "OVL510":
        code = "OVL510"
    if code == "OVL510":
        detail += "; the kernel never reads origins of lower layers"
    elif why:
        detail += f"; {why}"
    if layer.is_upper and fh is not None and _index_names(ctx, fh):
        # A directory index entry names this handle: the kernel verifies that its upper
        # directory carries it, and without an origin the mount fails (H4).
        ctx.fix(Finding(
            BY_CODE[code], layer, relpath,
            detail + f"; work/index/{fh.index_name()[:16]}... is named after it, and without the "
                     f"origin the kernel fails the mount (failed to verify index, err=-61): left as it is",
        ))
        return
    ctx.fix(Finding(
        BY_CODE[code], layer, relpath, detail,
        ops=(RemoveXattr(layer, relpath, ctx.xname("origin")),),
        action="remove the origin xattr", preen_ok=preen,
    ))


# --------------------------------------------------------------------------- rehandling


def _original_root(ctx: CheckContext, st: _State) -> Optional[str]:
    """After a copy within one filesystem: the host path of the ORIGINAL top lower layer,
    which the upper root's origin still names (a directory decodes with its path)."""
    if st.orig_root != "":
        return st.orig_root
    st.orig_root = None
    upper = ctx.stack.upper
    if upper is None or not ctx.stack.lowers:
        return None
    try:
        fh = handles.decode(ctx.xa.read_all(upper.path).get("origin") or b"")
        res = _resolve(ctx, st, upper, fh)
    except (OSError, handles.HandleError, handles.UnknownHandle):
        return None
    if res.kind == "found" and res.where is None and res.decoded.path and \
            stat.S_ISDIR(res.decoded.st.st_mode):
        st.orig_root = res.decoded.path.rstrip("/")
    return st.orig_root


def _at_original_path(ctx: CheckContext, st: _State, dec: handles.Decoded,
                      mode: int) -> Optional[Member]:
    """The copy of the object `dec` (an original outside the layers): the object at the
    same path in the copy's top lower layer, when the decode gave a path and it matches."""
    root = _original_root(ctx, st)
    if not root or not dec.path or not dec.path.startswith(root + "/"):
        return None
    rel = dec.path[len(root) + 1:]
    new, _why = st.rh.at(ctx.stack.lowers[0], rel, mode, rehandle.FROM_ORIGINAL)
    return new


def _rehandle(ctx: CheckContext, st: _State, layer: Layer, relpath: str, entry: Entry,
              fh: handles.OvlFh, indexed: bool, detail: str,
              cand: Optional[Member], exact: Optional["rehandle.NewHandle"] = None,
              source: str = rehandle.FROM_PATH) -> tuple[bool, str]:
    """A stale origin of an upper entry: rewrite it when the object it must now name is
    known (the record; `exact`, the copy of the original it names; else `cand`, the object
    at the same path beneath, of the same type). Returns (reported here, why not
    rewritten). Indexed files are decided after the walk, from all their aliases."""
    if not layer.is_upper:
        return False, ""
    try:
        s = entry.lstat()
    except OSError:
        return False, ""
    mode = s.st_mode
    if indexed and not entry.is_dir:
        c = None
        if exact is not None:
            try:
                host = os.path.join(exact.layer.path, exact.relpath)
                cs = os.lstat(host)
                c = _Cand(exact.layer, exact.relpath, host, (cs.st_dev, cs.st_ino), cs.st_mode,
                          True, exact.source)
            except OSError:
                pass
        elif cand is not None and not cand.entry.is_dir:
            try:
                cs = cand.entry.lstat()
                c = _Cand(cand.layer, cand.relpath, cand.entry.path, (cs.st_dev, cs.st_ino),
                          cs.st_mode, source == rehandle.FROM_DATA, source)
            except OSError:
                pass
        st.moved.append(_Moved(relpath, (s.st_dev, s.st_ino), fh, mode, detail, c))
        return True, ""
    new, why = st.rh.from_record(fh, mode=mode, below=layer)
    if new is None and exact is not None:
        new = exact
    elif new is None and cand is not None and not entry.is_dir:
        try:
            cmode = cand.entry.lstat().st_mode
        except OSError:
            cmode = 0
        if stat.S_IFMT(cmode) == stat.S_IFMT(mode):
            new = st.rh.from_path(cand.layer, cand.relpath, cand.entry.path, source)
        else:
            where = "its data lookup or redirect finds" if source == rehandle.FROM_DATA else "at the same path is"
            why += f"; the lower entry {where} {_type_name(cmode)}, this is {_type_name(mode)}"
    elif new is None and cand is None and not entry.is_dir:
        why += ("; its data lookup or redirect finds no lower file" if source == rehandle.FROM_DATA
                else "; there is no lower file at the same path")
    if new is None:
        return False, why
    _rewrite(ctx, st, layer, relpath, fh, new, detail)
    return True, ""


def _rewrite(ctx: CheckContext, st: _State, layer: Layer, relpath: str, fh: handles.OvlFh,
             new: "rehandle.NewHandle", detail: str, aliases: tuple[str, ...] = ()) -> None:
    st.rh.learn(fh, new)
    if aliases:
        detail += f"; also seen as {', '.join(quoted(a) for a in aliases[:3])}" + (
            f" and {len(aliases) - 3} more" if len(aliases) > 3 else "") + " (the same inode)"
    ctx.fix(Finding(
        BY_CODE["OVL520"], layer, relpath,
        f"{detail}; it must now name {new.where}, found from {new.source}",
        ops=(SetXattr(layer, relpath, ctx.xname("origin"), new.fh.encode()),),
        action=f"set origin to {new.describe()}",
        preen_ok=new.source == rehandle.FROM_RECORD,
        batch_ok=True,  # one xattr per file, thousands after a copy: group-committed
        rechecks=False,
    ))


def _finish_moved(ctx: CheckContext, st: _State) -> None:
    """Indexed files with a stale origin, per upper inode: the record, else the one lower
    object of the same type found at the paths of its aliases, else elimination."""
    groups: dict[tuple[int, int], list[_Moved]] = {}
    for m in st.moved:
        groups.setdefault(m.upper_key, []).append(m)
    upper = ctx.stack.upper
    left: list[tuple[list[_Moved], str]] = []  # no candidate at any path: elimination
    unplaced: list[tuple[list[_Moved], str]] = []
    for ms in sorted(groups.values(), key=lambda g: min(os.fsencode(m.relpath) for m in g)):
        ms.sort(key=lambda m: os.fsencode(m.relpath))
        first = ms[0]
        new, why = st.rh.from_record(first.fh, mode=first.mode, below=upper)
        if new is None:
            cands = {}
            exact = [m.cand for m in ms if m.cand is not None and m.cand.exact]
            for m in ms:
                if m.cand is not None and stat.S_IFMT(m.cand.mode) == stat.S_IFMT(first.mode):
                    cands.setdefault(m.cand.key, m.cand)
            where = "its path" if len(ms) == 1 else "the paths of its aliases"
            if exact:
                c = exact[0]
                new = st.rh.from_path(c.layer, c.relpath, c.host, c.source)
            elif len(cands) == 1:
                c = next(iter(cands.values()))
                new = st.rh.from_path(c.layer, c.relpath, c.host, rehandle.FROM_PATH if len(ms) == 1
                                      else rehandle.FROM_ALIASES)
            elif not cands:
                left.append((ms, why + f"; no lower file of the same type at {where}"))
                continue
            else:
                why += f"; {where} name {len(cands)} different lower files"
        if new is not None:
            _rewrite(ctx, st, upper, first.relpath, first.fh, new, first.detail,
                     tuple(m.relpath for m in ms[1:]))
        else:
            unplaced.append((ms, why))
    placed = _by_elimination(ctx, st, [ms for ms, _why in left]) if left else {}
    for i, (ms, why) in enumerate(left):
        new = placed.get(i)
        if new is not None:
            _rewrite(ctx, st, upper, ms[0].relpath, ms[0].fh, new, ms[0].detail,
                     tuple(m.relpath for m in ms[1:]))
        else:
            unplaced.append((ms, why + "; elimination among the lower hardlinks leaves no single one"))
    for ms, why in unplaced:
        first = ms[0]
        others = tuple(m.relpath for m in ms[1:])
        detail = first.detail + (f" (also seen as {', '.join(quoted(o) for o in others[:3])})"
                                 if others else "")
        if not _unindex(ctx, first, len(ms), f"{detail}; not rewritten: {why}"):
            _left_indexed(ctx, upper, first.relpath, f"{detail}; not rewritten: {why}")


def _by_elimination(ctx: CheckContext, st: _State, left: list[list[_Moved]]) -> dict[int, "rehandle.NewHandle"]:
    """{index in `left`: new handle} for the indexed groups that elimination among the lower
    hardlinks places (ovlfsck/elimination.py says what is certain and what is required)."""
    from ovlfsck.passes.index import parse_nlink  # the index pass owns the nlink format

    upper = ctx.stack.upper
    known: list[tuple[int, elimination.Group]] = []  # (index in `left`, its group)
    for i, ms in enumerate(left):
        host = os.path.join(upper.path, ms[0].relpath)
        try:
            s = os.lstat(host)
            nlink = parse_nlink(ctx.xa.read_all(host).get("nlink"))
        except OSError:
            continue
        known.append((i, elimination.Group(host, s, len(ms), nlink)))
    if not known:
        return {}
    lowers = [lay for lay in ctx.stack.lowers if lay.role is Role.LOWER]
    cands = elimination.lower_hardlinks(lowers, {stat.S_IFMT(g.st.st_mode) for _i, g in known})
    taken = st.rh.targets()
    work = ctx.stack.work
    # Same data means the same type and size (a symlink's size is its target's length):
    # only those inodes are looked up in the merged view.
    shapes = {(stat.S_IFMT(g.st.st_mode), g.st.st_size) for _i, g in known}
    free: list[elimination.Cand] = []
    fhs: dict[tuple[int, int], handles.OvlFh] = {}
    for c in cands:
        if (stat.S_IFMT(c.st.st_mode), c.st.st_size) not in shapes:
            continue
        fh = st.rh.encode(c.layer, c.names[0])
        if fh is None:
            continue
        if (fh.uuid + bytes((fh.fid_type,)) + fh.fid) in st.claims or rehandle.fh_key(fh) in taken:
            continue  # another upper entry's origin names it
        if work is not None and os.path.lexists(os.path.join(work.path, "index", fh.index_name())):
            continue  # indexed already
        for rel in c.names:
            chain = ctx.walker.lookup_merged(rel.split("/"))
            top = chain.members[0] if chain.members else None
            if top is not None and top.layer == c.layer and top.relpath == rel:
                c.visible += 1
            else:
                c.hidden += 1
        free.append(c)
        fhs[c.key] = fh
    found = elimination.match([g for _i, g in known], free)
    return {known[j][0]: rehandle.NewHandle(fhs[c.key], c.layer, c.names[0], rehandle.FROM_ELIMINATION)
            for j, c in found.items()}


def _unindex(ctx: CheckContext, m: "_Moved", n_upper: int, detail: str) -> bool:
    """The -y fallback for an indexed file whose lower object cannot be told: when its nlink
    xattr shows that every alias is in the upper layer (no lower alias shows its data), make
    it a plain upper file: nothing visible changes but st_ino, and no data is lost (the index
    link goes to the quarantine). True if reported here."""
    upper = ctx.stack.upper
    path = os.path.join(upper.path, m.relpath)
    try:
        s = os.lstat(path)
        xa = ctx.xa.read_all(path)
    except OSError:
        return False
    from ovlfsck.passes.index import parse_nlink  # the index pass owns the nlink format
    parsed = parse_nlink(xa.get("nlink"))
    if parsed is None or parsed[0] != "U" or s.st_nlink + parsed[1] != n_upper:
        return False
    ops = [RemoveXattr(upper, m.relpath, ctx.xname("origin")),
           RemoveXattr(upper, m.relpath, ctx.xname("nlink"))]
    work = ctx.stack.work
    index_rel = f"index/{m.fh.index_name()}"
    note = ""
    if work is not None:
        try:
            ist = os.lstat(os.path.join(work.path, index_rel))
        except OSError:
            ist = None
        if ist is not None and (ist.st_dev, ist.st_ino) == (s.st_dev, s.st_ino):
            ops.append(Quarantine(work, index_rel))
            note = f", and its index link {index_rel[:22]}... goes to the quarantine"
    ctx.fix(Finding(
        BY_CODE["OVL505"], upper, m.relpath,
        detail + f"; its nlink xattr counts {n_upper} link(s), all of them in the upper layer, so "
                 f"no lower alias shows its data",
        ops=tuple(ops), preen_ok=False,
        action=f"make it a plain upper file: remove origin and nlink{note} (the data stays in "
               f"upper:{quoted(m.relpath)}; only st_ino changes)",
    ))
    return True


_ST_INO = ("removing it changes nothing the overlay shows except st_ino, which becomes the "
           "upper inode's")


def _stale(ctx: CheckContext, layer: Layer, relpath: str, entry: Entry, indexed: bool,
           detail: str, is_dir: bool, fh: Optional[handles.OvlFh] = None, why: str = "") -> None:
    if not layer.is_upper:
        _remove(ctx, "OVL510", layer, relpath, detail, preen=False)
        return
    if why:
        detail += f"; not rewritten: {why}"
    if indexed:
        _left_indexed(ctx, layer, relpath, detail)
        return
    _remove(ctx, "OVL504", layer, relpath, detail + "; the kernel ignores it silently", preen=False,
            why="" if is_dir else _ST_INO, fh=fh if is_dir else None)


def _left_indexed(ctx: CheckContext, layer: Layer, relpath: str, detail: str) -> None:
    """An indexed hardlink whose origin cannot be rewritten with certainty: reported, and
    left as it is (the data stays in the upper file and its index entry)."""
    ctx.fix(Finding(
        BY_CODE["OVL505"], layer, relpath,
        detail + "; the file is an indexed hardlink, so its aliases come apart; left as it is "
                 f"(its data stays in {layer.name}:{quoted(relpath)}): give the record made at the "
                 "original location, or mount with index=off knowing that the hardlinks are "
                 "separate files",
    ))


def _outside(ctx: CheckContext, layer: Layer, relpath: str, indexed: bool, detail: str, is_dir: bool,
             fh: Optional[handles.OvlFh] = None, why: str = "") -> None:
    if not layer.is_upper:
        _remove(ctx, "OVL510", layer, relpath, detail, preen=False)
        return
    if why:
        detail += f"; not rewritten: {why}"
    if indexed:
        _left_indexed(ctx, layer, relpath,
                      detail + " (were the layers copied within one filesystem?)")
        return
    why = "copied layers still point at the originals" if not is_dir else ""
    if not is_dir:
        why += "; removing it changes this file's st_ino to the upper inode's"
    _remove(ctx, "OVL506", layer, relpath, detail, preen=False, why=why, fh=fh if is_dir else None)


def _check_merged_dir(ctx: CheckContext, st: _State, layer: Layer, relpath: str, entry: Entry,
                      fh: handles.OvlFh, lower: Member) -> None:
    ok = _matches(ctx, st, lower.layer, lower.entry.path, fh, exact=True)
    if ok is None:
        return
    if ok:
        st.verified += 1
        return
    st.stale += 1
    new = encode_origin(ctx, lower.layer, lower.entry.path, _encode_uuid(ctx, st, lower.layer))
    if new is None:
        return
    target = f"{lower.layer.name}:{quoted(lower.relpath) if lower.relpath else '(root)'}"
    moved = False
    if fh.same_object(new):
        why = (f"the handle names {target} but is not byte-identical to what the kernel writes "
               f"(flags {fh.flags:#x}, version {fh.version})")
        elsewhere = False
    else:
        res = _resolve(ctx, st, layer, fh)
        elsewhere = res.kind == "found" and res.where is not None and res.where[1] != lower.relpath \
            and res.where[0].depth > layer.depth
        moved = res.kind == "nouuid" or (res.kind == "found" and res.where is None)
        if layer.is_upper and moved:
            # A handle of the old location: an index entry named after it follows (index pass).
            st.rh.learn(fh, rehandle.NewHandle(new, lower.layer, lower.relpath,
                                               rehandle.FROM_MERGED_DIR, upper_rel=relpath))
        if res.kind == "found":
            why = f"the origin names {_shown_where(res)}, not {target} which it merges"
            if elsewhere:
                why += " (was it renamed from there and lost its redirect?)"
            elif res.where is None:
                why += " (outside the layers: were the layers copied?)"
        else:
            why = f"the origin is not the handle of {target} which it merges: {res.detail}"
    if not layer.is_upper:
        code = "OVL510"
        why += "; the kernel never reads origins of lower layers"
    elif st.nfs_in_use:
        code = "OVL507"
        why += (f"; with nfs_export the kernel does not merge it: failed to verify origin "
                f"({_pd2(lower.entry.path)}, ino={_ino(lower.entry)}, err=-116), and its lower content "
                f"is hidden")
    elif moved:
        code = "OVL520"  # copied layers: every handle of the old location is rewritten
        why += "; with nfs_export=on the lower content would be hidden"
    else:
        code = "OVL508"
        why += "; with nfs_export=on the lower content would be hidden"
    ctx.fix(Finding(
        BY_CODE[code], layer, relpath, why,
        ops=(SetXattr(layer, relpath, ctx.xname("origin"), new.encode()),),
        action=f"set origin to the handle of {target} ({handles.describe_fid(new)})",
        preen_ok=(not elsewhere) if layer.is_upper else False,
        batch_ok=True,  # one xattr per directory, thousands after a copy: group-committed
        rechecks=code != "OVL520",
    ))


# =========================================================================== after the walk


def finish(ctx: CheckContext) -> None:
    st = _state(ctx)
    _finish_pending(ctx, st)
    _finish_moved(ctx, st)
    _finish_claims(ctx, st)
    if ctx.stack.upper is not None:
        _check_root(ctx, st)
    if st.null_verified and ctx.stack.features.uuid is None and ctx.stack.upper is not None:
        ctx.fix(Finding(
            BY_CODE["OVL513"], ctx.stack.upper, "",
            f"{st.null_verified} handle(s) verify only with a null uuid (e.g. {st.null_example}); "
            f"mount these layers with uuid=off",
        ))


def _find_paths(ctx: CheckContext, st: _State, wanted: dict[int, set[int]]) -> dict[tuple[int, int], tuple[Layer, str]]:
    """Where the wanted inodes ({dev: {ino}}) are in the lower layers: one scandir walk of
    the lower layers on those filesystems, stopping when all are found."""
    found: dict[tuple[int, int], tuple[Layer, str]] = {}
    for layer in ctx.stack.lowers:
        dev = _layer_dev(st, layer)
        want = wanted.get(dev) if dev is not None else None
        if not want:
            continue
        for sub, de in walk_tree(layer.path):
            try:
                ino = de.inode()
            except OSError:
                continue
            if ino in want:
                try:
                    s = os.lstat(de.path)
                except OSError:
                    s = None
                if s is not None and s.st_dev == dev and s.st_ino == ino:
                    found[(dev, ino)] = (layer, sub)
                    want.discard(ino)
                    if not want:
                        break
    return found


def _finish_pending(ctx: CheckContext, st: _State) -> None:
    if not st.pending:
        return
    wanted: dict[int, set[int]] = {}
    places: dict[tuple[int, int], tuple[Layer, str]] = {}
    for p in st.pending:
        if p.decoded.path is not None:
            where = _place(ctx, p.decoded.path)
            if where is not None:
                places[p.decoded.key] = where
                continue
        wanted.setdefault(p.decoded.st.st_dev, set()).add(p.decoded.st.st_ino)
    if wanted:
        places.update(_find_paths(ctx, st, wanted))
    for p in st.pending:
        where = places.get(p.decoded.key)
        if where is None or where[0].depth <= p.layer.depth:
            st.stale += 1
            shown = quoted(p.decoded.path) if p.decoded.path else handles.describe_fid(p.fh)
            detail = f"origin decodes to {shown}, which is in no lower layer beneath {p.layer.name}"
            why = ""
            if where is None and p.layer.is_upper:
                # Outside the layers: the layers were copied within one filesystem.
                try:
                    mode = p.entry.lstat().st_mode
                except OSError:
                    mode = p.decoded.st.st_mode
                done, why = _rehandle(ctx, st, p.layer, p.relpath, p.entry, p.fh, p.indexed,
                                      detail + " (were the layers copied within one filesystem?)",
                                      p.lower, _at_original_path(ctx, st, p.decoded, mode),
                                      source=p.source)
                if done:
                    continue
            if p.metacopy:
                continue  # the metacopy pass reports an origin that is not its data's
            _outside(ctx, p.layer, p.relpath, p.indexed, detail, False, why=why)
            continue
        st.verified += 1
        if p.metacopy:
            continue
        if not p.layer.is_upper or p.indexed or p.decoded.st.st_nlink != 1:
            continue  # st_ino comes from the origin only for nlink 1 or indexed files
        # Renamed after copy-up: fine if the overlay does not show the origin elsewhere.
        lay, rel = where
        chain = ctx.walker.lookup_merged(rel.split("/")) if rel else None
        if chain is None or not chain.members:
            continue
        top = chain.members[0]
        if top.layer == lay and top.relpath == rel:
            try:
                if "origin" not in ctx.xa.read_all(p.entry.path):
                    continue  # removed through a hard link by another fix of this round
            except OSError:
                continue
            ctx.fix(Finding(
                BY_CODE["OVL514"], p.layer, p.relpath,
                f"its origin is {lay.name}:{quoted(rel)}, which the overlay still shows at "
                f"{quoted(rel)}: both map to one overlay inode and the second lookup fails: "
                f"failed to get inode (-116), ESTALE",
                ops=(RemoveXattr(p.layer, p.relpath, ctx.xname("origin")),),
                action="remove the origin xattr (st_ino becomes the upper inode's)",
            ))


def _finish_claims(ctx: CheckContext, st: _State) -> None:
    upper = ctx.stack.upper
    for key, claims in st.claims.items():
        if type(claims) is not list:
            continue  # one claim
        groups: dict[tuple[int, int], list[_Claim]] = {}
        for relpath, dev, ino, own, indexed in claims:
            groups.setdefault((dev, ino), []).append(_Claim(relpath, (dev, ino), own, indexed))
        if len(groups) < 2:
            continue
        fh = handles.OvlFh(flags=handles.CPU_ENDIAN_FLAG, fid_type=key[16], uuid=key[:16],
                           fid=key[17:])
        res = _resolve(ctx, st, upper, fh)
        if res.kind != "found" or res.decoded is None or res.decoded.st.st_nlink != 1:
            continue  # st_ino is not taken from a lower object with several links
        ordered = sorted(groups.values(), key=lambda g: min(os.fsencode(c.relpath) for c in g))
        own = [g for g in ordered if any(c.at_own_path for c in g)]
        if len(own) == 1:
            keeper, preen = own[0], True
            why = f"{quoted(min(c.relpath for c in keeper))} is at the origin's own path and keeps it"
        else:
            keeper, preen = ordered[0], False
            why = "the paths do not tell which is right; the first in path order keeps it"
        keep_path = min((c.relpath for c in keeper), key=os.fsencode)
        for g in ordered:
            if g is keeper:
                continue
            # One finding per upper inode: its hard links share the xattr.
            paths = sorted((c.relpath for c in g), key=os.fsencode)
            also = f" (and its hard links {', '.join(quoted(p) for p in paths[1:])})" if len(paths) > 1 else ""
            st.stale += 1
            ctx.fix(Finding(
                BY_CODE["OVL514"], upper, paths[0],
                f"{quoted(paths[0])}{also} and {quoted(keep_path)} (not hard links) carry the same "
                f"origin ({_shown_where(res)}): both map to one overlay inode and the second "
                f"lookup fails: failed to get inode (-116), ESTALE; {why}",
                ops=(RemoveXattr(upper, paths[0], ctx.xname("origin")),),
                action="remove the origin xattr (st_ino becomes the upper inode's)",
                preen_ok=preen,
            ))


# --------------------------------------------------------------------------- mount-time checks


def _isolated(st: _State) -> bool:
    """Every other origin verified: a root/index mismatch is then a local accident."""
    return st.stale == 0 and st.verified > 0


def _check_root(ctx: CheckContext, st: _State) -> None:
    upper = ctx.stack.upper
    assert upper is not None
    try:
        root_x = ctx.xa.read_all(upper.path)
    except OSError:
        return
    _check_uuid_xattr(ctx, upper, root_x)
    if not st.index_in_use or not ctx.stack.lowers:
        return
    lower0 = ctx.stack.lowers[0]
    raw = root_x.get("origin")
    if raw:
        _check_root_origin(ctx, st, upper, lower0, raw)
    index_dir = _index_dir(ctx)
    if index_dir is not None:
        try:
            up = ctx.xa.get(index_dir, "upper")
        except OSError:
            up = None
        if up:
            _check_index_upper(ctx, st, upper, up)


def _check_uuid_xattr(ctx: CheckContext, upper: Layer, root_x: dict[str, bytes]) -> None:
    value = root_x.get("uuid")
    if value is None or len(value) == 16:
        return
    mode = ctx.stack.features.uuid
    effect = ("not read with uuid=" + mode) if mode in ("null", "off") else \
        f"the kernel logs `failed to get uuid ({os.path.basename(upper.path)}, err={len(value)}); " \
        f"falling back to uuid=null.` at every mount"
    ctx.fix(Finding(
        BY_CODE["OVL512"], upper, "", f"uuid xattr of {len(value)} bytes ({_hex(value)}); {effect}",
        ops=(RemoveXattr(upper, "", ctx.xname("uuid")),),
        action="remove the uuid xattr (the kernel creates a new one where it would for a new overlay)",
    ))


def _check_root_origin(ctx: CheckContext, st: _State, upper: Layer, lower0: Layer, raw: bytes) -> None:
    new = encode_origin(ctx, lower0, lower0.path, _encode_uuid(ctx, st, lower0))
    try:
        fh = handles.decode(raw)
    except (handles.HandleError, handles.UnknownHandle) as exc:
        if new is None:
            return
        # ovl_verify_set_fh: the kernel rewrites it (and logs `invalid origin` if invalid).
        code = "OVL501" if isinstance(exc, handles.HandleError) else "OVL502"
        ctx.fix(Finding(
            BY_CODE[code], upper, "", f"upper root origin {_hex(raw)}: {exc}; with the index the "
            f"kernel replaces it at the next mount",
            ops=(SetXattr(upper, "", ctx.xname("origin"), new.encode()),),
            action=f"set origin to the handle of {lower0.name}'s root ({handles.describe_fid(new)})",
        ))
        return
    ok = _matches(ctx, st, lower0, lower0.path, fh, exact=True)
    if ok is None or ok:
        return
    if new is None:
        return
    res = _resolve(ctx, st, upper, fh)
    if res.kind == "found":
        why = f"it names {_shown_where(res)}"
        inside = res.where is not None
        if inside:
            why += ", a directory of the layers (was the upper put on another lower?)"
        else:
            why += ", outside the layers (were the layers copied?)"
    else:
        inside = False
        why = res.detail + " (were the layers copied, or the lower replaced?)"
    preen = _isolated(st) and not inside
    why += ("; every other origin verifies against the current lowers"
            if _isolated(st) else
            f"; {st.stale} other origin(s) do not verify either: the index is probably stale too")
    ctx.fix(Finding(
        BY_CODE["OVL509"], upper, "",
        f"{why}; a mount with index=on fails: failed to verify upper root origin",
        ops=(SetXattr(upper, "", ctx.xname("origin"), new.encode()),),
        action=f"set origin to the handle of {lower0.name}'s root ({handles.describe_fid(new)})",
        preen_ok=preen, rechecks=False,
    ))


def _check_index_upper(ctx: CheckContext, st: _State, upper: Layer, raw: bytes) -> None:
    work = ctx.stack.work
    assert work is not None
    new = encode_origin(ctx, upper, upper.path, _encode_uuid(ctx, st, upper), upper=True)
    try:
        fh = handles.decode(raw)
    except (handles.HandleError, handles.UnknownHandle) as exc:
        if new is None:
            return
        ctx.fix(Finding(
            BY_CODE["OVL511"], work, "index",
            f"upper xattr {_hex(raw)}: {exc}; the kernel logs `invalid origin` and rewrites it",
            ops=(SetXattr(work, "index", ctx.xname("upper"), new.encode()),),
            action=f"set upper to the handle of the upper root ({handles.describe_fid(new)})",
        ))
        return
    ok = _matches(ctx, st, upper, upper.path, fh, exact=True, upper=True)
    if ok is None or ok:
        return
    if new is None:
        return
    why = f"it is {handles.describe_fid(fh)}"
    other_upper = False
    if _uuid_ok(ctx, upper, fh.uuid):
        try:
            dec = handles.decode_on(upper.path, fh)
        except handles.HandleDecodeUnsupported:
            dec = None
        if dec is not None:
            other_upper = True
            shown = quoted(dec.path) if dec.path else handles.describe_fid(fh)
            why = (f"it names {shown}, another directory (were the layers copied, or is this workdir "
                   f"used with another upper directory?)")
        else:
            why = f"it names {handles.describe_fid(fh)}, which does not exist any more (were the layers copied?)"
    else:
        why = f"its uuid {handles.format_uuid(fh.uuid)} is not the upper filesystem's (were the layers copied?)"
    ctx.fix(Finding(
        BY_CODE["OVL511"], work, "index",
        f"{why}; a mount with index=on fails: failed to verify index dir 'upper' xattr",
        ops=(SetXattr(work, "index", ctx.xname("upper"), new.encode()),),
        action=f"set upper to the handle of the upper root ({handles.describe_fid(new)})",
        preen_ok=_isolated(st) and not other_upper, rechecks=False,
    ))
