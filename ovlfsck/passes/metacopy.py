"""Metacopy files: xattr format, lower data reachable by path or absolute redirect (data-only layers included); protattr values.

The data of a metacopy file is found the way `ovl_lookup_layers` (fs/overlayfs/namei.c)
finds it, modelled here step by step because the walker stops a non-directory chain at its
top entry (6.18 behaviour, measured on 6.18.44):

- the lookup starts at the metacopy file's own layer with its own name in its parent's
  layers beneath; the file's redirect (read unless it is in the lowermost layer and there is
  no data-only layer: `d->last`) renames the target: a bare name in the same parent, or an
  absolute path walked from the root of every lower layer beneath (intermediate
  directories' opaque and redirect xattrs apply, `ovl_lookup_layer`);
- a whiteout or anything but a regular file ends the lookup without data; a regular file
  without the metacopy xattr is the data; another metacopy file is passed through (its own
  redirect, if any, applies from there on), and an opaque directory on the way does not
  stop the chain once a metacopy file is found there (`d->stop = !d->metacopy`);
- when no data was found: if a metacopy file of a regular *lower* layer was met (`ctr`),
  there are data-only layers, and the last redirect checked was absolute
  (`d->absolute_redirect`, which every directory met on an absolute walk resets to its own
  redirect's kind: a lower directory on the way disarms the data-only lookup), the data is
  looked up lazily at open in each data-only layer (`vfs_path_lookup` with LOOKUP_BENEATH,
  LOOKUP_NO_SYMLINKS, LOOKUP_NO_XDEV; it must be a regular file); otherwise the lookup
  fails with EIO;
- the first lower file found for an upper metacopy file must be the one its `origin`
  names, if that origin decodes to a regular file: with index=on the lookup fails otherwise
  (H29, ESTALE), with index=off the file silently shows the other file's data (H29b);
- with metacopy=off every step beneath a metacopy file is refused (EPERM); only the lazy
  data-only lookup of a file with no regular layer beneath it is exempt.

Boundary with passes/origins.py: this pass reports only what is specific to metacopy files:
where the data is, and whether an upper metacopy file's origin is the lower file found
(`metacopy-origin-mismatch`: the kernel's H29 check under index=on; under index=off the
same mismatch shows another file's data). Malformed, stale or wrongly typed origins of any
file, metacopy files included, are the origins pass's.

Fixes never touch data: the only changes are the metacopy xattr's value when it is
malformed (made empty, what the kernel writes without a digest), a stray metacopy or
protattr xattr, and a redirect that the file's own origin proves wrong.
"""
from __future__ import annotations

import ctypes
import errno
import os
import stat
from dataclasses import dataclass, field
from typing import Optional

from ovlfsck import handles, rehandle
from ovlfsck.engine import CheckContext, Finding
from ovlfsck.fsio import Entry, Kind, display, lstat_entry, special_items
from ovlfsck.problems import BY_CODE
from ovlfsck.repair import RemoveXattr, SetXattr
from ovlfsck.stack import Layer
from ovlfsck.walk import DirVisit, Member, join, validate_redirect

# include/uapi/linux/fsverity.h and fs/overlayfs/overlayfs.h
METACOPY_MIN_SIZE = 4
METACOPY_MAX_SIZE = 68
DIGEST_SIZE = {1: 32, 2: 64}  # FS_VERITY_HASH_ALG_SHA256, FS_VERITY_HASH_ALG_SHA512
PROTATTR_MAX = 32

_KIND_NAME = {
    Kind.DIR: "a directory", Kind.LNK: "a symlink", Kind.CHR: "a character device",
    Kind.BLK: "a block device", Kind.FIFO: "a fifo", Kind.SOCK: "a socket",
    Kind.GONE: "gone",
}


# --------------------------------------------------------------------------- value formats


def check_metacopy_value(value: bytes) -> tuple[Optional[str], str]:
    """(None | 'too-small' | 'malformed', detail) for a metacopy xattr value."""
    size = len(value)
    if size == 0:
        return None, ""
    if size < METACOPY_MIN_SIZE:
        return "too-small", f"{size} byte{'s' if size > 1 else ''}: {value.hex()}"
    version, length, algo = value[0], value[1], value[3]  # value[2]: flags, none defined
    digest = size - METACOPY_MIN_SIZE
    problems = []
    if size > METACOPY_MAX_SIZE:
        problems.append(f"{size} bytes, more than {METACOPY_MAX_SIZE}")
    if version != 0:
        problems.append(f"version {version}")
    if length != size:
        problems.append(f"length field {length} for {size} bytes")
    if algo == 0:
        if digest:
            problems.append(f"{digest} digest bytes without an algorithm")
    elif algo in DIGEST_SIZE:
        if digest != DIGEST_SIZE[algo]:
            problems.append(f"digest algorithm {algo} needs {DIGEST_SIZE[algo]} bytes, has {digest}")
    else:
        problems.append(f"unknown digest algorithm {algo}")
    if problems:
        return "malformed", "; ".join(problems)
    return None, ""


def has_digest(value: bytes) -> bool:
    return len(value) > METACOPY_MIN_SIZE or (len(value) == METACOPY_MIN_SIZE and value[3] != 0)


def check_protattr_value(value: bytes) -> Optional[str]:
    """None if the kernel honours the value (ovl_check_protattr), else why not."""
    if len(value) == 0:
        return "empty value"
    if len(value) > PROTATTR_MAX:
        return f"{len(value)} bytes, more than {PROTATTR_MAX} (ignored without a message)"
    bad = bytes(sorted(set(value) - set(b"ai")))
    if bad:
        return f"value {value!r}: only the letters 'a' and 'i' are defined"
    return None


# --------------------------------------------------------------------------- handles


class _FileHandle(ctypes.Structure):
    _fields_ = [
        ("handle_bytes", ctypes.c_uint),
        ("handle_type", ctypes.c_int),
        ("f_handle", ctypes.c_ubyte * handles.MAX_HANDLE_SZ),
    ]


def _decoded_mode(mount_path: str, fh: handles.OvlFh) -> Optional[int]:
    """st_mode of the object `fh` names on the filesystem of `mount_path`, or None when it
    does not decode (what exportfs_decode_fh says: ESTALE for a deleted inode)."""
    if len(fh.fid) > handles.MAX_HANDLE_SZ:
        return None
    h = _FileHandle()
    h.handle_bytes = len(fh.fid)
    h.handle_type = fh.fid_type
    ctypes.memmove(h.f_handle, fh.fid, len(fh.fid))
    try:
        mfd = os.open(mount_path, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW)
    except OSError:
        return None
    try:
        libc = handles._libc
        fd = libc.open_by_handle_at(mfd, ctypes.byref(h), os.O_PATH | os.O_NOFOLLOW)
        if fd < 0:
            return None
        try:
            return os.fstat(fd).st_mode
        finally:
            os.close(fd)
    finally:
        os.close(mfd)


# --------------------------------------------------------------------------- the lookup model


@dataclass(frozen=True)
class Node:
    layer: Layer
    relpath: str
    entry: Entry

    def where(self) -> str:
        return f"{self.layer.name}:{display(self.relpath)}"

    @property
    def key(self) -> tuple[str, str]:
        return (self.layer.name, self.relpath)


@dataclass
class Resolution:
    """Where the lookup of a metacopy file's data ends."""

    kind: str  # 'data' | 'nodata' | 'lazy-missing' | 'invalid' | 'too-small' | 'h29'
    data: Optional[Node] = None
    first_lower: Optional[Node] = None
    chain: list[Node] = field(default_factory=list)  # metacopy files met, the start first
    iterated: bool = False  # a layer beneath a metacopy file was consulted (EPERM with metacopy=off)
    lazy: bool = False  # the data-only lookup was used
    culprit: Optional[Node] = None  # the file (or directory) whose xattr failed the lookup
    detail: str = ""

    @property
    def ok(self) -> bool:
        return self.kind == "data"


class Resolver:
    def __init__(self, ctx: CheckContext) -> None:
        self.ctx = ctx
        self.xa = ctx.xa
        self.layers = ctx.stack.namespace_layers
        self.lowers = ctx.stack.lowers
        self.datas = ctx.stack.datas
        self.lowermost_depth = self.layers[-1].depth
        self.index_on = _index_on(ctx)
        self._decodes: dict[bytes, bool] = {}

    def is_last(self, layer: Layer) -> bool:
        """`d->last` for a non-directory: the lowermost layer when there are no data-only
        layers; its redirect and intermediate directories' xattrs are then not read."""
        return not layer.is_upper and layer.depth == self.lowermost_depth and not self.datas

    # ------------------------------------------------------------------ lookups

    def _walk_abs(self, layer: Layer, comps: list[str]):
        """One layer of an absolute lookup: the walker's ovl_lookup_layer, with this
        resolver's notion of the last layer; a bad directory comes back as a Node."""
        entry, stop, comps, bad, flag = self.ctx.walker.lookup_path(
            layer, comps, read_xattrs=not self.is_last(layer))
        if bad is not None:
            return entry, stop, comps, (Node(bad.member.layer, bad.member.relpath, bad.member.entry),
                                        bad.value, bad.detail), flag
        return entry, stop, comps, None, flag

    def _data_lookup(self, layer: Layer, comps: list[str]) -> tuple[Optional[Node], str]:
        """vfs_path_lookup(root, path, LOOKUP_BENEATH|LOOKUP_NO_SYMLINKS|LOOKUP_NO_XDEV)
        in a data-only layer; the result must be a regular file."""
        try:
            root_dev = os.lstat(layer.path).st_dev
        except OSError as exc:
            return None, exc.strerror or "cannot read the layer root"
        stack: list[str] = []
        for i, comp in enumerate(comps):
            if comp == ".":
                continue
            if comp == "..":
                if not stack:
                    return None, "'..' would leave the layer (EXDEV)"
                stack.pop()
                continue
            stack.append(comp)
            path = os.path.join(layer.path, *stack)
            try:
                st = os.lstat(path)
            except FileNotFoundError:
                return None, f"no {'/'.join(stack)}"
            except NotADirectoryError:
                return None, f"{'/'.join(stack[:-1])} is not a directory"
            except OSError as exc:
                return None, f"{'/'.join(stack)}: {exc.strerror}"
            if stat.S_ISLNK(st.st_mode):
                return None, f"{'/'.join(stack)} is a symlink (ELOOP)"
            if st.st_dev != root_dev:
                return None, f"{'/'.join(stack)} is on another filesystem (EXDEV)"
            last = i == len(comps) - 1
            if last:
                if not stat.S_ISREG(st.st_mode):
                    return None, f"{'/'.join(stack)} is not a regular file"
                return Node(layer, "/".join(stack), Entry(comp, path, Kind.REG, st)), ""
            if not stat.S_ISDIR(st.st_mode):
                return None, f"{'/'.join(stack)} is not a directory"
        return None, "empty path"

    # ------------------------------------------------------------------ origins

    def origin_decodes(self, raw: bytes) -> bool:
        """Whether the kernel would decode this origin to a regular file of a lower layer
        (ovl_check_origin: ESTALE, an unknown or invalid handle, or a wrong type all mean
        'no origin', and then the lookup is not verified)."""
        if raw in self._decodes:
            return self._decodes[raw]
        result = False
        try:
            fh = handles.decode(raw)
        except ValueError:
            fh = None
        if fh is not None:
            uuid_off = self.ctx.stack.features.uuid == "off"
            tried: set[bytes] = set()
            for layer in self.lowers:
                uuid = self.ctx.layer_uuid(layer)
                if uuid is None:
                    continue
                if (fh.uuid != handles.NULL_UUID) if uuid_off else (fh.uuid != uuid):
                    continue
                if uuid in tried:
                    continue
                tried.add(uuid)
                mode = _decoded_mode(layer.path, fh)
                if mode is not None:
                    result = stat.S_ISREG(mode)
                    break
        self._decodes[raw] = result
        return result

    def origin_matches(self, raw: bytes, node: Node) -> Optional[bool]:
        """Whether the stored origin bytes are what the kernel would encode for `node`
        (ovl_verify_fh: length and bytes); None if the handle cannot be computed."""
        fresh = self.ctx.handle_of(node.layer, node.entry.path)
        if fresh is None:
            return None
        try:
            stored = handles.decode(raw)
        except ValueError:
            return False
        if self.ctx.stack.features.uuid == "off":
            fresh = handles.OvlFh(fresh.flags, fresh.fid_type, handles.NULL_UUID, fresh.fid)
        return stored.encode() == fresh.encode()

    # ------------------------------------------------------------------ resolve

    def resolve(
        self,
        start: Node,
        below: list[tuple[Member, Optional[dict[str, Entry]]]],
        ignore_redirect: bool = False,
    ) -> Resolution:
        """The kernel's lookup of the data of the metacopy file `start`, whose parent's
        layers beneath it are `below` (member, listing or None)."""
        xa = self.xa
        res = Resolution("nodata", chain=[start])
        sx = self.ctx.xattrs_of(start.layer, start.relpath, start.entry)
        origin = sx.get("origin") if start.layer.is_upper else None
        # With index=on the kernel verifies the first lower found against the origin (H29);
        # with index=off it does not, and shows that file's data: wrong either way.
        verify = bool(origin and self.origin_decodes(origin))
        ctr = 0 if start.layer.is_upper else 1
        name = start.relpath.rpartition("/")[2]
        cur_name = name
        comps: Optional[list[str]] = None  # set: absolute mode
        abs_flag = False
        last_depth = start.layer.depth
        if not self.is_last(start.layer) and not ignore_redirect and "redirect" in sx:
            value = sx["redirect"]
            problem, detail = validate_redirect(value)
            if problem:
                res.kind, res.culprit = "invalid", start
                res.detail = f"redirect {value!r}: {detail}"
                return res
            text = os.fsdecode(value)
            if text.startswith("/"):
                comps, abs_flag = text[1:].split("/"), True
            else:
                cur_name = text
        idx = 0
        ended = ""
        while True:
            if comps is None:
                while idx < len(below) and below[idx][0].layer.depth <= last_depth:
                    idx += 1
                if idx >= len(below):
                    break
                member, listing = below[idx]
                idx += 1
                layer = member.layer
                if listing is not None:
                    entry = listing.get(cur_name)
                else:
                    entry = lstat_entry(os.path.join(member.entry.path, cur_name))
                relpath = join(member.relpath, cur_name)
                stop_here = False
            else:
                cands = [lay for lay in self.layers if lay.depth > last_depth]
                if not cands:
                    break
                layer = cands[0]
                relpath = "/".join(comps)  # the path walked in this layer (before rewrites)
                entry, stop_here, comps, bad, flag = self._walk_abs(layer, comps)
                if flag is not None:
                    abs_flag = flag
                if bad is not None:
                    node, value, detail = bad
                    res.kind, res.culprit = "invalid", node
                    res.detail = f"directory {node.where()} on the way has redirect {value!r}: {detail}"
                    return res
            res.iterated = True
            last_depth = layer.depth
            if entry is None:
                if stop_here:
                    ended = f"the lookup of /{'/'.join(comps or [])} stops in {layer.name} (opaque directory, whiteout or file on the way)"
                    break
                continue
            node = Node(layer, relpath, entry)
            if entry.is_whiteout(xa):
                ended = f"{node.where()} is a whiteout"
                break
            kind = entry.get_kind()
            if kind is not Kind.REG:
                ended = f"{node.where()} is {_KIND_NAME.get(kind, 'not a regular file')}, not a regular file"
                break
            x = entry.xattrs(xa)
            mc = x.get("metacopy")
            if mc is not None and 0 < len(mc) < METACOPY_MIN_SIZE:
                res.kind, res.culprit = "too-small", node
                res.detail = f"{node.where()} on the way has a {len(mc)}-byte metacopy xattr"
                return res
            if mc is not None and not self.is_last(layer) and "redirect" in x:
                problem, detail = validate_redirect(x["redirect"])
                if problem:
                    res.kind, res.culprit = "invalid", node
                    res.detail = f"{node.where()} on the way has redirect {x['redirect']!r}: {detail}"
                    return res
            if res.first_lower is None:
                res.first_lower = node
                if verify and self.origin_matches(origin, node) is False:
                    res.kind = "h29"
                    res.detail = f"the lookup finds {node.where()}, the origin names another file; " + (
                        "with index=on the lookup fails (ESTALE)" if self.index_on else
                        "with index=off the file shows that file's data")
                    return res
            if mc is None:
                res.kind, res.data = "data", node
                return res
            ctr = 1
            res.chain.append(node)
            if self.is_last(layer):
                ended = f"{node.where()} is itself a metacopy file in the lowermost layer"
                break
            value = x.get("redirect")
            if value is None:
                abs_flag = False
                continue
            text = os.fsdecode(value)
            if text.startswith("/"):
                comps, abs_flag = text[1:].split("/"), True
            else:
                abs_flag = False
                if comps is None:
                    cur_name = text
                else:
                    comps = comps[:-1] + [text]
        # No data in the regular layers.
        if ctr and self.datas and abs_flag and comps is not None:
            res.lazy = True
            errors = []
            for layer in self.datas:
                node, why = self._data_lookup(layer, comps)
                if node is not None:
                    res.kind, res.data = "data", node
                    return res
                errors.append(f"{layer.name}: {why}")
            res.kind = "lazy-missing"
            res.detail = f"/{'/'.join(comps)} in the data-only layers: " + "; ".join(errors)
            return res
        res.kind = "nodata"
        if not ended:
            target = f"/{'/'.join(comps)}" if comps is not None else repr(cur_name)
            in_data = bool(comps is not None and any(
                self._data_lookup(layer, comps)[0] is not None for layer in self.datas))
            if ctr == 0 and comps is None and not below:
                ended = "its directory has no lower directory beneath it (opaque or new)"
            elif in_data and ctr == 0:
                ended = (f"{target} is only in a data-only layer, which an upper metacopy file "
                         "cannot use directly")
            elif in_data:
                ended = (f"{target} is only in a data-only layer, but the data-only lookup is not "
                         "armed: the last redirect checked is not absolute (a lower directory on "
                         "the way resets it)")
            elif self.is_last(start.layer):
                ended = "it is in the lowermost layer: nothing lies beneath"
            else:
                ended = f"no layer beneath has {target}"
        if len(res.chain) > 1:
            ended += " (via " + ", ".join(n.where() for n in res.chain[1:]) + ")"
        res.detail = ended
        return res


def _index_on(ctx: CheckContext) -> bool:
    hint = ctx.stack.features.index
    if hint is not None:
        return hint
    work = ctx.stack.work
    return bool(work and os.path.isdir(os.path.join(work.path, "index")))


# --------------------------------------------------------------------------- per-round state


@dataclass
class _State:
    walker: object
    resolver: Resolver
    refused: list[str] = field(default_factory=list)  # metacopy files a metacopy=off mount refuses
    no_digest: list[str] = field(default_factory=list)
    # Origin mismatches (H29), decided at finish: the origins pass may rewrite a stale origin
    # (a copied layer set) to name the very file the lookup finds (issue 4).
    mismatched: list[tuple] = field(default_factory=list)


_STATE: dict[int, _State] = {}


def _state(ctx: CheckContext) -> _State:
    st = _STATE.get(id(ctx))
    if st is None or st.walker is not ctx.walker:
        st = _State(ctx.walker, Resolver(ctx))
        _STATE[id(ctx)] = st
    return st


# --------------------------------------------------------------------------- the pass


# walk.DirVisit.quiet: nothing for this pass (it looks at special entries (and the upper
# root) only).
QUIET_SKIP = True


def check(ctx: CheckContext, visit: DirVisit) -> None:
    st = _state(ctx)
    xa = ctx.xa
    for k, (member, listing) in enumerate(zip(visit.members, visit.listings)):
        layer = member.layer
        if layer.is_upper and member.relpath == "" and visit.path == "" and not visit.hidden:
            _check_protattr(ctx, layer, "", ctx.xattrs_of(layer, "", member.entry))
        # Entries without overlay xattrs are skipped below: special_items leaves them out
        # when the listing knows them.
        for name, entry in special_items(listing):
            kind = entry.get_kind()
            if kind is Kind.GONE:
                continue
            rel = join(member.relpath, name)
            x = ctx.xattrs_of(layer, rel, entry)
            if not x:
                continue
            if layer.is_upper and "protattr" in x:
                _check_protattr(ctx, layer, rel, x)
            if "metacopy" not in x:
                continue
            if kind is not Kind.REG:
                ctx.fix(Finding(
                    BY_CODE["OVL803"], layer, rel, f"on {_KIND_NAME.get(kind, 'a non-regular file')}",
                    ops=(RemoveXattr(layer, rel, ctx.xname("metacopy")),),
                    action="remove the metacopy xattr",
                ))
                continue
            if entry.is_whiteout(xa):
                continue  # a whiteout first (ovl_path_is_whiteout): the xattr is never read
            chain = visit.chains.get(name)
            on_top = (not visit.hidden and chain is not None and chain.top is not None
                      and chain.top.key == (layer.name, rel))
            below = list(zip(visit.members[k + 1:], visit.listings[k + 1:]))
            _check_file(ctx, st, Node(layer, rel, entry), x, below, on_top)


def _check_file(ctx, st: _State, node: Node, x: dict[str, bytes], below, on_top: bool) -> None:
    value = x["metacopy"]
    problem, detail = check_metacopy_value(value)
    resolver = st.resolver
    res = resolver.resolve(node, below)
    if problem == "too-small":
        _too_small(ctx, resolver, node, detail, res)
        return
    if problem == "malformed":
        require = ctx.stack.features.verity == "require"
        ctx.fix(Finding(
            BY_CODE["OVL802"], node.layer, node.relpath, detail,
            ops=(SetXattr(node.layer, node.relpath, ctx.xname("metacopy"), b""),),
            action="write the empty metacopy value (no digest)",
            preen_ok=False if require else None,
        ))
    elif ctx.stack.features.verity == "require" and not has_digest(value) and on_top:
        st.no_digest.append(node.where())
    if on_top and (res.iterated or not res.lazy):
        st.refused.append(node.where())
    _report_resolution(ctx, resolver, node, x, res, below)


def _too_small(ctx, resolver: Resolver, node: Node, detail: str, res: Resolution) -> None:
    """Sizes 1-3: EIO on every lookup. Make the value empty when the file surely has no data
    of its own, or exactly the data the lookup would find."""
    ops: tuple = ()
    note = ""
    own = _has_own_data(node.entry.path)
    if own is False:
        ops = (SetXattr(node.layer, node.relpath, ctx.xname("metacopy"), b""),)
        note = "the file holds no data of its own"
    elif own and res.ok and res.data is not None and _same_content(node.entry.path, res.data.entry.path):
        ops = (SetXattr(node.layer, node.relpath, ctx.xname("metacopy"), b""),)
        note = f"the file holds the same data as {res.data.where()}"
    elif own:
        note = ("the file holds data of its own that differs from the lower data (or there is "
                "none): left for a decision")
    else:
        note = "cannot tell whether the file holds data of its own"
    ctx.fix(Finding(
        BY_CODE["OVL801"], node.layer, node.relpath, f"{detail}; {note}", ops=ops,
        action="write the empty metacopy value (no digest)" if ops else None,
    ))


def _report_resolution(ctx, resolver: Resolver, node: Node, x: dict[str, bytes], res: Resolution, below) -> None:
    if res.kind == "data":
        data = res.data
        if data is not None:
            try:
                mine, theirs = node.entry.lstat().st_size, data.entry.lstat().st_size
            except OSError:
                return
            if mine != theirs:
                ctx.fix(Finding(
                    BY_CODE["OVL810"], node.layer, node.relpath,
                    f"{mine} bytes; its data {data.where()} has {theirs}",
                ))
        return
    if res.kind == "lazy-missing":
        ctx.fix(Finding(BY_CODE["OVL806"], node.layer, node.relpath, res.detail))
        return
    if res.kind == "too-small":
        ctx.fix(Finding(BY_CODE["OVL804"], node.layer, node.relpath,
                        f"{res.detail}: the lookup fails (EIO)"))
        return
    if res.kind == "invalid" and res.culprit is not None and res.culprit.key == node.key:
        code = "OVL805"
    elif res.kind == "invalid":
        code = "OVL804"
    elif res.kind == "h29":
        _state(ctx).mismatched.append((node, x, res, below))
        return
    else:
        code = "OVL804"
    _report_failure(ctx, resolver, node, x, res, below, code)


def _rehandled_to_data(ctx, resolver: Resolver, x: dict[str, bytes],
                       first_lower: Optional[Node]) -> bool:
    """The origins pass rewrites this stale origin (copied layers) to the handle of the
    very lower file the lookup finds: no mismatch is left once it is written."""
    raw = x.get("origin")
    if not raw or first_lower is None:
        return False
    try:
        fh = handles.decode(raw)
    except ValueError:
        return False
    new = rehandle.get(ctx).learned(fh)
    # By handle, not by path: the record keeps one path of a lower inode that has several.
    return new is not None and resolver.origin_matches(new.fh.encode(), first_lower) is True


def _report_failure(ctx, resolver: Resolver, node: Node, x: dict[str, bytes], res: Resolution,
                    below, code: str) -> None:
    ops: tuple = ()
    action = None
    detail = res.detail
    if "redirect" in x:
        try:
            links = node.entry.lstat().st_nlink
        except OSError:
            links = 0
        if links == 1:
            proof = _origin_proves_own_path(ctx, resolver, node, x, below)
            if proof is not None:
                ops = (RemoveXattr(node.layer, node.relpath, ctx.xname("redirect")),)
                action = f"remove the redirect: the origin names {proof.where()}, found at the file's own path"
        elif links > 1:
            # The xattr belongs to the inode: removing it would also change every other
            # link (or the index entry), whose own path proves nothing.
            detail += f"; the file has {links} links, which share the redirect: left for a decision"
    ctx.fix(Finding(BY_CODE[code], node.layer, node.relpath, detail, ops=ops, action=action))


def _origin_proves_own_path(ctx, resolver: Resolver, node: Node, x: dict[str, bytes], below) -> Optional[Node]:
    """The lower file found at the metacopy file's own path when the file's origin names
    it and its data resolves from there; None otherwise."""
    origin = x.get("origin")
    if not origin:
        return None
    alt = resolver.resolve(node, below, ignore_redirect=True)
    if alt.kind != "data" or alt.first_lower is None:
        return None
    if resolver.origin_matches(origin, alt.first_lower) is not True:
        return None
    return alt.first_lower


def _check_protattr(ctx, layer: Layer, rel: str, x: dict[str, bytes]) -> None:
    value = x.get("protattr")
    if value is None:
        return
    why = check_protattr_value(value)
    if why is None:
        return
    ctx.fix(Finding(
        BY_CODE["OVL851"], layer, rel, why,
        ops=(RemoveXattr(layer, rel, ctx.xname("protattr")),),
        action="remove the protattr xattr (the file stays neither append-only nor immutable, as now)",
    ))


def finish(ctx: CheckContext) -> None:
    st = _STATE.pop(id(ctx), None)
    if st is None or st.walker is not ctx.walker:
        return
    for node, x, res, below in st.mismatched:
        if not _rehandled_to_data(ctx, st.resolver, x, res.first_lower):
            _report_failure(ctx, st.resolver, node, x, res, below, "OVL807")
    f = ctx.stack.features
    if st.refused:
        first = st.refused[0]
        n = len(st.refused)
        what = f"{n} metacopy file{'s' if n > 1 else ''}, first {first}"
        if ctx.xa.namespace == "user":
            ctx.fix(Finding(BY_CODE["OVL808"], None, "",
                            f"{what}: userxattr cannot be combined with metacopy=on"))
        elif f.metacopy is False:
            ctx.fix(Finding(BY_CODE["OVL808"], None, "", f"{what}: metacopy=off is given"))
        elif f.metacopy is None and f.verity in (None, "off"):
            ctx.fix(Finding(BY_CODE["OVL809"], None, "", what))
    if st.no_digest:
        n = len(st.no_digest)
        ctx.fix(Finding(BY_CODE["OVL811"], None, "",
                        f"{n} metacopy file{'s' if n > 1 else ''} without a digest, first {st.no_digest[0]}"))


# --------------------------------------------------------------------------- file data


def _has_own_data(path: str) -> Optional[bool]:
    """Whether the file has allocated data (SEEK_DATA finds some); None if unknown.

    st_blocks cannot tell: ext4 counts an external xattr block in it."""
    try:
        fd = _open_ro(path)
    except OSError:
        return None
    try:
        if os.fstat(fd).st_size == 0:
            return False
        try:
            os.lseek(fd, 0, os.SEEK_DATA)
            return True
        except OSError as exc:
            if exc.errno == errno.ENXIO:
                return False
            return None
    finally:
        os.close(fd)


def _open_ro(path: str) -> int:
    try:
        return os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NOATIME | os.O_NONBLOCK)
    except PermissionError:  # O_NOATIME needs ownership (or CAP_FOWNER)
        return os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)


def _same_content(a: str, b: str, chunk: int = 1 << 20) -> bool:
    try:
        fa, fb = _open_ro(a), None
        try:
            fb = _open_ro(b)
            if os.fstat(fa).st_size != os.fstat(fb).st_size:
                return False
            while True:
                x, y = os.read(fa, chunk), os.read(fb, chunk)
                if x != y:
                    return False
                if not x:
                    return True
        finally:
            os.close(fa)
            if fb is not None:
                os.close(fb)
    except OSError:
        return False

