"""Opaque values; opaque and redirect xattrs on things that are not directories."""
from __future__ import annotations

from ovlfsck.engine import CheckContext, Finding
from ovlfsck.fsio import Kind, special_items
from ovlfsck.problems import BY_CODE
from ovlfsck.repair import RemoveXattr
from ovlfsck.walk import DirVisit, join

_DIR = Kind.DIR
_REG = Kind.REG
_GONE = Kind.GONE


# walk.DirVisit.quiet: nothing for this pass (it looks at directories' xattrs and special
# entries only).
QUIET_SKIP = True


def check(ctx: CheckContext, visit: DirVisit) -> None:
    xa = ctx.xa
    for member, listing in zip(visit.members, visit.listings):
        if member.relpath != "":
            _check_dir(ctx, member.layer, member.relpath, member.entry.xattrs(xa))
        for name, entry in special_items(listing):
            kind = entry.kind
            if kind is None:
                kind = entry.get_kind()
            if kind is _DIR or kind is _GONE:
                continue
            x = entry.xattrs(xa)
            if not x or ("opaque" not in x and "redirect" not in x):
                continue
            rel = join(member.relpath, name)
            if "opaque" in x:
                ctx.fix(Finding(
                    BY_CODE["OVL202"], member.layer, rel, f"value {x['opaque']!r}",
                    ops=(RemoveXattr(member.layer, rel, ctx.xname("opaque")),),
                    action="remove the opaque xattr",
                ))
            if "redirect" in x and (kind is not _REG or "metacopy" not in x):
                ctx.fix(Finding(
                    BY_CODE["OVL310"], member.layer, rel, f"value {x['redirect']!r}",
                    ops=(RemoveXattr(member.layer, rel, ctx.xname("redirect")),),
                    action="remove the redirect xattr",
                ))


def _check_dir(ctx: CheckContext, layer, relpath: str, x: dict[str, bytes]) -> None:
    value = x.get("opaque")
    if value is None or value == b"y":
        return
    if value == b"x":
        if layer.is_upper:
            ctx.fix(Finding(
                BY_CODE["OVL203"], layer, relpath, "",
                ops=(RemoveXattr(layer, relpath, ctx.xname("opaque")),),
                action="remove the opaque xattr",
            ))
        return
    ctx.fix(Finding(
        BY_CODE["OVL201"], layer, relpath, f"value {value!r}; the directory is not opaque",
        ops=(RemoveXattr(layer, relpath, ctx.xname("opaque")),),
        action="remove the opaque xattr (what the kernel shows stays the same)",
    ))
