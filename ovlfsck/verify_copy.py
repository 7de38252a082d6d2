"""`ovlfsck verify-copy`: compare a layer set with its copy for what overlay needs.

Copy tools silently drop exactly the things overlayfs stores outside file contents
(user-needs.md F11, F17, F21-F23; overlay-format.md §5.1, §9.1, §9.3, §14 rule 14):

* whiteouts (0/0 character devices) and xattr whiteouts (`<ns>.overlay.whiteout` on an
  empty file): lost, turned into regular files or into other device numbers;
* the private `trusted.overlay.*` / `user.overlay.*` xattrs (origin, redirect, opaque,
  impure, nlink, metacopy, upper, uuid, ...): missing or changed;
* hard links: an upper file and its `work/index` entry are one inode (§9.1); a copy that
  splits them breaks indexed hardlinks (G6). Hardlink groups inside a layer too;
* ownership and permission bits; entries missing altogether.

The original is walked once, layer by layer, directory by directory (one sorted scandir per
directory; symlinks are never followed); each entry is compared with the same relative path
in the copy. Only entries with more than one link are remembered (to compare hardlink
groups), so memory grows with the number of multiply-linked inodes, not with the tree.

Nothing is written. `verify_copy()` returns a `VerifyResult`; `format_text()` renders it.
Run it right after the copy, *before* `ovlfsck check -y` on the copy: the repair rewrites
handles (origin, upper, index names), which would then show up here as "changed".
"""
from __future__ import annotations

import errno
import os
import stat
from collections import Counter
from dataclasses import dataclass, field
from typing import Iterator, Optional

import xattr as _xattr

from ovlfsck.errors import OperationalError, UsageError
from ovlfsck.fsio import display
from ovlfsck.stack import Layer, Stack

# Loss kinds, in the order the report lists them.
WHITEOUT = "whiteout"
XATTR = "xattr"
INDEX_LINK = "index-link"
HARDLINK = "hardlink"
OWNER = "owner"
MODE = "mode"
TYPE = "type"
CONTENT = "content"
MISSING = "missing"
KINDS = (MISSING, WHITEOUT, XATTR, INDEX_LINK, HARDLINK, TYPE, CONTENT, OWNER, MODE)

_OVERLAY_PREFIXES = ("trusted.overlay.", "user.overlay.")


@dataclass(frozen=True)
class Loss:
    kind: str
    layer: str  # layer name (upper, work, lower:N, data:N)
    path: str  # layer-relative path
    original: str  # what the original had
    copy: str  # what the copy has

    def as_dict(self) -> dict:
        return {"kind": self.kind, "layer": self.layer, "path": self.path,
                "original": self.original, "copy": self.copy}


@dataclass
class VerifyResult:
    losses: list[Loss] = field(default_factory=list)
    entries: int = 0  # original entries compared (layer roots included)
    layers: int = 0
    counts: Counter = field(default_factory=Counter)  # losses per kind
    notes: list[str] = field(default_factory=list)  # harmless differences worth a line
    namespace: str = "trusted"

    @property
    def ok(self) -> bool:
        return not self.losses

    def add(self, loss: Loss) -> None:
        self.losses.append(loss)
        self.counts[loss.kind] += 1

    def as_dict(self) -> dict:
        return {
            "layers": self.layers,
            "entries": self.entries,
            "losses": [loss.as_dict() for loss in self.losses],
            "counts": {k: self.counts[k] for k in KINDS if self.counts[k]},
            "advice": {k: advice(k, self.namespace) for k in KINDS if self.counts[k]},
            "notes": list(self.notes),
        }


# --------------------------------------------------------------------------- advice

def advice(kind: str, namespace: str = "trusted") -> str:
    """The likely cause of a kind of loss and the copy command that would have kept it."""
    good = ("copy upper and work (and the lowers) in ONE run, as root: "
            "`rsync -aHAX --numeric-ids BASE/ DEST/`, or "
            "`tar --xattrs --xattrs-include='*' -cpf - -C BASE lower upper work | "
            "tar --xattrs --xattrs-include='*' -xpf - -C DEST`, or `cp -a BASE DEST`")
    if kind == WHITEOUT:
        return ("whiteouts are 0/0 character devices: `rsync` without `--devices`/`-D` (use -a) "
                "drops them, a copy as non-root cannot create them (mknod EPERM; `tar` as "
                "non-root skips them), archive converters may turn them into files; xattr "
                "whiteouts need the xattrs copied too. Without them deleted files reappear. "
                f"Fix: {good}")
    if kind == XATTR:
        ns = ("trusted.* xattrs are only visible to root: a copy made as non-root silently "
              "drops them; " if namespace == "trusted" else "")
        return (f"{ns}`rsync` without -X drops xattrs; GNU `tar` needs --xattrs at create AND "
                "--xattrs --xattrs-include='*' at extract (by default it restores only user.*); "
                "`cp` without -a/--preserve=xattr drops them (and cp -a does not report "
                "failures). Without them redirects, opaque dirs, origins and the index are "
                f"lost. Fix: {good}")
    if kind == INDEX_LINK:
        return ("an upper file and its work/index entry were one inode and are now two: "
                "`rsync` without -H, or upper and work copied in separate `cp -a`/`tar`/`rsync` "
                "runs (hardlinks are kept only within one run). With index=on the indexed "
                "hardlinks come apart or the entry is taken for an orphan. "
                f"Fix: {good}")
    if kind == HARDLINK:
        return (f"hardlinks split: `rsync` without -H, or the tree copied in pieces. Fix: {good}")
    if kind == OWNER:
        return ("ownership changed: the copy ran as non-root, or with `--no-same-owner` "
                "(tar), without -o/-g or with name mapping (rsync: add --numeric-ids), "
                f"or into a user namespace. Fix: {good}")
    if kind == MODE:
        return ("permission bits changed: `tar -x` without -p as non-root (umask), `rsync` "
                f"without -p, `cp` without -a/-p. Fix: {good}")
    if kind == TYPE:
        return ("the file type changed (a special file or symlink copied as a regular file, "
                f"or a dereferenced symlink: `cp -L`, `rsync -L`). Fix: {good}")
    if kind == CONTENT:
        return ("size or symlink target differs: the layers changed during the copy (copy "
                "only unmounted layers) or the copy was cut short (disk full). "
                f"Fix: unmount, then {good}")
    if kind == MISSING:
        return ("entries missing: the copy was incomplete, excluded paths (rsync --exclude, "
                "-x/--one-file-system), skipped special files (rsync without -D), or ran as "
                f"non-root on unreadable entries. Fix: {good}")
    return good


# --------------------------------------------------------------------------- stacks

def _pairs(original: Stack, copy: Stack) -> list[tuple[Layer, Layer]]:
    shape_o = (len(original.lowers), len(original.datas), bool(original.upper), bool(original.work))
    shape_c = (len(copy.lowers), len(copy.datas), bool(copy.upper), bool(copy.work))
    if shape_o != shape_c:
        raise UsageError(
            "the original and the copy have different shapes (lowers, data layers, upper, "
            f"work): {shape_o} vs {shape_c}")
    pairs = list(zip(original.all_layers, copy.all_layers))
    for a, b in pairs:
        if os.path.realpath(a.path) == os.path.realpath(b.path):
            raise UsageError(f"{a.name}: the original and the copy are the same directory "
                             f"({display(a.path)})")
    return pairs


def mirror_stack(stack: Stack, src_base: str, dst_base: str) -> Stack:
    """The stack whose layers are the paths of `stack` with `src_base` replaced by `dst_base`.

    For `verify-copy --from BASE --to DEST -o <original options>`: every layer must lie
    under `src_base`.
    """
    src = os.path.realpath(src_base)
    dst = os.path.realpath(dst_base)

    def move(layer: Optional[Layer]) -> Optional[Layer]:
        if layer is None:
            return None
        rel = os.path.relpath(layer.path, src)
        if rel == ".." or rel.startswith("../") or os.path.isabs(rel):
            raise UsageError(f"{layer.name} ({display(layer.path)}) is not under {display(src)}")
        return Layer(layer.role, layer.index, os.path.normpath(os.path.join(dst, rel)), layer.depth)

    return Stack(
        lowers=tuple(move(x) for x in stack.lowers),
        datas=tuple(move(x) for x in stack.datas),
        upper=move(stack.upper),
        work=move(stack.work),
        features=stack.features,
        ignored_options=stack.ignored_options,
    )


# --------------------------------------------------------------------------- reading

def _lstat(path: str) -> Optional[os.stat_result]:
    try:
        return os.lstat(path)
    except (FileNotFoundError, NotADirectoryError):
        return None
    except OSError as exc:
        raise OperationalError(f"{display(path)}: cannot stat: {exc.strerror}") from exc


def _overlay_xattrs(path: str) -> dict[str, bytes]:
    """All `trusted.overlay.*` and `user.overlay.*` xattrs (escaped ones included)."""
    try:
        names = _xattr.list(path, nofollow=True)
    except OSError as exc:
        if exc.errno in (errno.ENOTSUP, errno.ENOENT, errno.ENOTDIR, errno.EPERM):
            return {}
        raise OperationalError(f"{display(path)}: cannot list xattrs: {exc.strerror}") from exc
    out: dict[str, bytes] = {}
    for raw in names:
        name = raw.decode("utf-8", "surrogateescape") if isinstance(raw, bytes) else raw
        if not name.startswith(_OVERLAY_PREFIXES):
            continue
        try:
            out[name] = _xattr.get(path, name, nofollow=True)
        except OSError as exc:
            if exc.errno in (errno.ENODATA, errno.ENOENT):
                continue
            if exc.errno in (errno.EACCES, errno.EPERM) and name.startswith("trusted."):
                raise OperationalError(
                    f"{display(path)}: cannot read trusted.overlay.* xattrs: run as root"
                ) from exc
            raise OperationalError(f"{display(path)}: cannot read xattr {name}: "
                                   f"{exc.strerror}") from exc
    return out


def _is_chr_whiteout(st: os.stat_result) -> bool:
    return stat.S_ISCHR(st.st_mode) and st.st_rdev == 0


def _is_xwhiteout(st: os.stat_result, xattrs: dict[str, bytes]) -> bool:
    return (stat.S_ISREG(st.st_mode) and st.st_size == 0
            and any(n.endswith(".overlay.whiteout") and n.count(".") == 2 for n in xattrs))


def _describe(st: Optional[os.stat_result], xattrs: Optional[dict] = None) -> str:
    if st is None:
        return "nothing"
    mode = st.st_mode
    if _is_chr_whiteout(st):
        return "whiteout (char 0:0)"
    if stat.S_ISCHR(mode) or stat.S_ISBLK(mode):
        kind = "char" if stat.S_ISCHR(mode) else "block"
        return f"{kind} device {os.major(st.st_rdev)}:{os.minor(st.st_rdev)}"
    if stat.S_ISREG(mode):
        if xattrs is not None and _is_xwhiteout(st, xattrs):
            return "xattr whiteout (empty file with overlay.whiteout)"
        return f"regular file ({st.st_size} bytes)"
    return {stat.S_IFDIR: "directory", stat.S_IFLNK: "symlink", stat.S_IFIFO: "fifo",
            stat.S_IFSOCK: "socket"}.get(stat.S_IFMT(mode), "unknown type")


def _show(value: Optional[bytes]) -> str:
    if value is None:
        return "absent"
    if value and all(32 <= b < 127 for b in value):
        return repr(value.decode())
    return "hex:" + value.hex() if len(value) <= 48 else f"hex:{value[:48].hex()}… ({len(value)} bytes)"


def _sorted_names(path: str) -> list[str]:
    try:
        with os.scandir(path) as it:
            return sorted(de.name for de in it)
    except OSError as exc:
        raise OperationalError(f"{display(path)}: cannot read directory: {exc.strerror}") from exc


# --------------------------------------------------------------------------- the walk

@dataclass
class _Links:
    """Hardlink groups of the original (only inodes with nlink > 1)."""

    # (st_dev, st_ino) of the original -> (copy (st_dev, st_ino) or None, first layer, first path,
    # whiteout?)
    groups: dict = field(default_factory=dict)
    whiteout_splits: int = 0


def verify_copy(original: Stack, copy: Stack, namespace: str = "trusted") -> VerifyResult:
    """Compare every layer of `original` with the same layer of `copy`; see the module doc."""
    if namespace not in ("trusted", "user"):
        raise UsageError(f"unknown xattr namespace {namespace!r}")
    pairs = _pairs(original, copy)
    result = VerifyResult(namespace=namespace)
    links = _Links()
    for a, b in pairs:
        if _lstat(a.path) is None:
            raise OperationalError(f"{a.name}: original layer {display(a.path)} does not exist")
        result.layers += 1
        for loss in _walk_layer(a, b, links, result):
            result.add(loss)
    if links.whiteout_splits:
        result.notes.append(
            f"{links.whiteout_splits} link(s) of shared whiteout inodes were copied as separate "
            "whiteouts (harmless: the kernel shares whiteouts only to save inodes)")
    return result


def _walk_layer(a: Layer, b: Layer, links: _Links, result: VerifyResult) -> Iterator[Loss]:
    # Depth-first, names sorted per directory: a stack of (relative dir, iterator of names).
    yield from _compare(a, b, "", links, result)
    if not (os.path.isdir(b.path) and not os.path.islink(b.path)):
        return
    stack: list[tuple[str, Iterator[str]]] = [("", iter(_sorted_names(a.path)))]
    while stack:
        rel_dir, names = stack[-1]
        name = next(names, None)
        if name is None:
            stack.pop()
            continue
        rel = os.path.join(rel_dir, name) if rel_dir else name
        descend = False
        for loss in _compare(a, b, rel, links, result):
            yield loss
        sa = _lstat(os.path.join(a.path, rel))
        sb = _lstat(os.path.join(b.path, rel))
        if sa is not None and sb is not None and stat.S_ISDIR(sa.st_mode) and stat.S_ISDIR(sb.st_mode):
            descend = True
        if descend:
            stack.append((rel, iter(_sorted_names(os.path.join(a.path, rel)))))


def _compare(a: Layer, b: Layer, rel: str, links: _Links, result: VerifyResult) -> Iterator[Loss]:
    pa = os.path.join(a.path, rel) if rel else a.path
    pb = os.path.join(b.path, rel) if rel else b.path
    shown = display(rel) if rel else "."
    sa = _lstat(pa)
    if sa is None:  # vanished from the original during the walk
        return
    result.entries += 1
    sb = _lstat(pb)
    xa = _overlay_xattrs(pa)
    if sb is None:
        kind = WHITEOUT if _is_chr_whiteout(sa) or _is_xwhiteout(sa, xa) else MISSING
        yield Loss(kind, a.name, shown, _describe(sa, xa), "nothing")
        return
    xb = _overlay_xattrs(pb)
    wa = _is_chr_whiteout(sa) or _is_xwhiteout(sa, xa)
    wb = _is_chr_whiteout(sb) or _is_xwhiteout(sb, xb)
    if wa and not wb:
        yield Loss(WHITEOUT, a.name, shown, _describe(sa, xa), _describe(sb, xb))
        return
    if stat.S_IFMT(sa.st_mode) != stat.S_IFMT(sb.st_mode):
        yield Loss(TYPE, a.name, shown, _describe(sa, xa), _describe(sb, xb))
        return
    if (stat.S_ISCHR(sa.st_mode) or stat.S_ISBLK(sa.st_mode)) and sa.st_rdev != sb.st_rdev:
        kind = WHITEOUT if wa or wb else TYPE
        yield Loss(kind, a.name, shown, _describe(sa), _describe(sb))
    # xattrs (an xattr whiteout that lost its xattr was reported above)
    for name in sorted(set(xa) | set(xb)):
        va, vb = xa.get(name), xb.get(name)
        if va != vb and va is not None:
            yield Loss(XATTR, a.name, shown, f"{name}={_show(va)}",
                       "absent" if vb is None else f"{name}={_show(vb)}")
    if stat.S_ISREG(sa.st_mode) and sa.st_size != sb.st_size:
        yield Loss(CONTENT, a.name, shown, f"{sa.st_size} bytes", f"{sb.st_size} bytes")
    if stat.S_ISLNK(sa.st_mode):
        ta, tb = os.readlink(pa), os.readlink(pb)
        if ta != tb:
            yield Loss(CONTENT, a.name, shown, f"symlink to {display(ta)}", f"symlink to {display(tb)}")
    if (sa.st_uid, sa.st_gid) != (sb.st_uid, sb.st_gid):
        yield Loss(OWNER, a.name, shown, f"uid {sa.st_uid} gid {sa.st_gid}",
                   f"uid {sb.st_uid} gid {sb.st_gid}")
    if stat.S_IMODE(sa.st_mode) != stat.S_IMODE(sb.st_mode) and not stat.S_ISLNK(sa.st_mode):
        yield Loss(MODE, a.name, shown, f"{stat.S_IMODE(sa.st_mode):04o}",
                   f"{stat.S_IMODE(sb.st_mode):04o}")
    # hardlink groups (non-directories with more than one link in the original)
    if not stat.S_ISDIR(sa.st_mode) and sa.st_nlink > 1:
        key = (sa.st_dev, sa.st_ino)
        here = (sb.st_dev, sb.st_ino)
        first = links.groups.get(key)
        if first is None:
            links.groups[key] = (here, a.name, shown, wa)
        elif first[0] != here:
            if wa:
                links.whiteout_splits += 1
            else:
                f_layer, f_path = first[1], first[2]
                kind = INDEX_LINK if {f_layer, a.name} == {"upper", "work"} else HARDLINK
                where = f"{f_layer}:{f_path}" if f_layer != a.name else f_path
                yield Loss(kind, a.name, shown, f"same inode as {where}",
                           f"a separate inode from {where}")


# --------------------------------------------------------------------------- output

_TITLES = {
    MISSING: "entries missing",
    WHITEOUT: "whiteouts lost",
    XATTR: "overlay xattrs missing or changed",
    INDEX_LINK: "upper <-> work/index hardlinks broken",
    HARDLINK: "hardlink groups split",
    TYPE: "file types changed",
    CONTENT: "sizes or symlink targets differ",
    OWNER: "ownership changed",
    MODE: "permission bits changed",
}


def format_text(result: VerifyResult, limit: int = 20) -> str:
    """The report: a summary line, then per kind of loss up to `limit` examples and advice."""
    lines: list[str] = []
    if result.ok:
        lines.append(f"verify-copy: {result.entries} entries in {result.layers} layers compared: "
                     "the copy kept everything overlay needs")
    else:
        total = len(result.losses)
        lines.append(f"verify-copy: {result.entries} entries in {result.layers} layers compared: "
                     f"{total} loss{'es' if total != 1 else ''} in the copy")
        for kind in KINDS:
            items = [x for x in result.losses if x.kind == kind]
            if not items:
                continue
            lines.append("")
            lines.append(f"{_TITLES[kind]} ({len(items)}):")
            for loss in items[:limit]:
                lines.append(f"  {loss.layer}:{loss.path}: original {loss.original}; "
                             f"copy {loss.copy}")
            if len(items) > limit:
                lines.append(f"  ... and {len(items) - limit} more")
            lines.append(f"  likely cause: {advice(kind, result.namespace)}")
    for note in result.notes:
        lines.append(f"note: {note}")
    return "\n".join(lines) + "\n"
