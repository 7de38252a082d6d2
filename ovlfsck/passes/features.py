"""Which overlay features the layers actually use, and the mount options that follow.

Users pick mount options before they mount; the layers say what they need: redirects
need redirect_dir=on (or follow), metacopy files need metacopy=on, an index needs
index=on, directory or whiteout index entries mean nfs_export was on, null-uuid handles on
a filesystem with a real uuid mean uuid=off, user.overlay.* xattrs mean userxattr.
This pass reports nothing as a problem; it fills `ctx.features`.
"""
from __future__ import annotations

import os
import stat
from dataclasses import dataclass, field
from typing import Optional

from ovlfsck import handles
from ovlfsck.engine import CheckContext
from ovlfsck.fsio import Kind, special_items
from ovlfsck.walk import DirVisit, join

_REG = Kind.REG

# Feature names, in report order.
ORDER = ("redirect", "metacopy", "index", "nfs_export", "data_only", "xwhiteouts", "userxattr",
         "uuid", "uuid_off", "verity")

DESCRIPTION = {
    "redirect": "redirected directories (renamed merged directories) or metacopy redirects",
    "metacopy": "metadata-only copies (data still in a lower layer)",
    "index": "the inodes index (work/index; hardlinks kept across copy-up)",
    "nfs_export": "NFS export index entries (directory or whiteout entries in work/index)",
    "data_only": "data-only lower layers",
    "xwhiteouts": "xattr whiteouts in lower layers (opaque=x directories, kernel 6.7+)",
    "userxattr": "user.overlay.* xattrs instead of trusted.overlay.*",
    "uuid": "a persistent overlay uuid (uuid xattr on the upper root)",
    "uuid_off": "null uuids in stored file handles (made with uuid=off)",
    "verity": "fs-verity digests in metacopy xattrs",
}


@dataclass
class Use:
    count: int = 0
    example: Optional[str] = None  # "layer:path" of the first place seen

    def see(self, where: str) -> None:
        self.count += 1
        if self.example is None:
            self.example = where


@dataclass
class FeatureReport:
    used: dict[str, Use] = field(default_factory=dict)

    def see(self, feature: str, where: str) -> None:
        self.used.setdefault(feature, Use()).see(where)

    def mount_options(self, stack) -> tuple[list[str], list[str]]:
        """(options the layers need, notes about conflicts) — per overlay-format.md §7.2."""
        used = self.used
        opts: list[str] = []
        notes: list[str] = []
        if "userxattr" in used:
            opts.append("userxattr")
        if "metacopy" in used:
            opts.append("metacopy=on")
        if "redirect" in used:
            if "userxattr" in used:
                notes.append("the layers have redirects, but userxattr mounts never follow them "
                             "(redirect_dir=nofollow): renamed directories lose their lower content")
            elif "metacopy" not in used:  # metacopy=on turns redirect_dir=on on by itself
                opts.append("redirect_dir=on")
        if "index" in used or "nfs_export" in used:
            opts.append("index=on")
        if "nfs_export" in used:
            if "metacopy" in used:
                notes.append("the layers use both metacopy and nfs_export, which no mount can "
                             "enable together (conflicting options: nfs_export=on,metacopy=on)")
            else:
                opts.append("nfs_export=on")
        if "uuid_off" in used:
            opts.append("uuid=off")
        # A stored uuid xattr is used by the default uuid=auto: nothing to add.
        if "verity" in used:
            opts.append("verity=on")
        f = stack.features
        given = {
            "index": f.index, "nfs_export": f.nfs_export, "metacopy": f.metacopy,
        }
        for key, val in given.items():
            needed = f"{key}=on" in opts
            if needed and val is False:
                notes.append(f"{key}=off was given, but the layers use {key}")
        if "redirect" in used and f.redirect_dir == "nofollow":
            notes.append("redirect_dir=nofollow was given, but the layers have redirects: "
                         "lookups of those directories fail (refusing to follow redirect)")
        return opts, notes

    def as_json(self, stack) -> dict:
        opts, notes = self.mount_options(stack)
        return {
            "used": {name: {"count": self.used[name].count, "example": self.used[name].example,
                            "what": DESCRIPTION[name]}
                     for name in ORDER if name in self.used},
            "mount_options": ",".join(opts),
            "notes": notes,
        }


def _report(ctx: CheckContext) -> FeatureReport:
    rep = ctx.round_state("features", FeatureReport)
    ctx.features = rep  # the engine hands the last round's report to the reporters
    return rep


# walk.DirVisit.quiet: nothing for this pass (it looks at directories' xattrs and special
# entries only).
QUIET_SKIP = True


def check(ctx: CheckContext, visit: DirVisit) -> None:
    rep = _report(ctx)
    xa = ctx.xa
    for member, listing in zip(visit.members, visit.listings):
        dir_x = member.entry.xattrs(xa)
        if dir_x:
            where = f"{member.layer.name}:{member.relpath or '.'}"
            if "redirect" in dir_x and member.relpath:
                rep.see("redirect", where)
            if dir_x.get("opaque") == b"x" and not member.layer.is_upper:
                rep.see("xwhiteouts", where)
        for name, entry in special_items(listing):
            kind = entry.kind
            if kind is not _REG and (kind is not None or entry.get_kind() is not _REG):
                continue
            x = entry.xattrs(xa)
            if x and "metacopy" in x:
                here = f"{member.layer.name}:{join(member.relpath, name)}"
                rep.see("metacopy", here)
                if len(x["metacopy"]) > 4:
                    rep.see("verity", here)
                if "redirect" in x:
                    rep.see("redirect", here)


def finish(ctx: CheckContext) -> None:
    rep = _report(ctx)
    stack = ctx.stack
    if ctx.xa.namespace == "user":
        rep.see("userxattr", "stack")
    for layer in stack.datas:
        rep.see("data_only", f"{layer.name}:.")
    null_uuid_handles = False
    if stack.upper is not None:
        root_x = ctx.xa.read_all(stack.upper.path)
        if "uuid" in root_x:
            rep.see("uuid", "upper:.")
        if root_x.get("origin"):
            rep.see("index", "upper:. (origin of the upper root)")
            null_uuid_handles |= _null_uuid(root_x["origin"])
    if stack.work is not None:
        index_dir = os.path.join(stack.work.path, "index")
        try:
            names = os.listdir(index_dir)
        except OSError:
            names = []
        for name in sorted(names):
            try:
                fh = handles.decode_index_name(name)
            except ValueError:
                continue  # temporaries (#N) and junk say nothing about features
            where = f"work:index/{name}"
            rep.see("index", where)
            null_uuid_handles |= fh.uuid == handles.NULL_UUID
            try:
                st = os.lstat(os.path.join(index_dir, name))
            except OSError:
                continue
            if stat.S_ISDIR(st.st_mode) or (stat.S_ISCHR(st.st_mode) and st.st_rdev == 0):
                rep.see("nfs_export", where)
    if null_uuid_handles and stack.lowers:
        real = ctx.layer_uuid(stack.lowers[0])
        if real and real != handles.NULL_UUID:
            rep.see("uuid_off", "stored handles")


def _null_uuid(raw: bytes) -> bool:
    try:
        return handles.decode(raw).uuid == handles.NULL_UUID
    except ValueError:
        return False
