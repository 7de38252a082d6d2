"""Whiteouts: orphan, inside an opaque directory, in a non-merged directory; xwhiteouts."""
from __future__ import annotations

from ovlfsck.engine import CheckContext, Finding
from ovlfsck.fsio import Kind, special_items
from ovlfsck.problems import BY_CODE
from ovlfsck.repair import MakeWhiteout, Quarantine, SetXattr
from ovlfsck.walk import DirVisit, join

_DIR = Kind.DIR
_LNK = Kind.LNK


# walk.DirVisit.quiet: nothing for this pass (whiteouts are special entries).
QUIET_SKIP = True


def check(ctx: CheckContext, visit: DirVisit) -> None:
    xa = ctx.xa
    walker = ctx.walker
    n = len(visit.members)
    for i, (member, listing) in enumerate(zip(visit.members, visit.listings)):
        lowermost = walker.is_lowermost(member.layer)
        dir_x = member.entry.xattrs(xa)
        opaque = member.relpath != "" and not lowermost and dir_x.get("opaque") == b"y"
        unmarked_x: list[str] = []
        for name, entry in special_items(listing):
            kind = entry.kind
            if kind is _DIR or kind is _LNK or not entry.is_whiteout(xa):
                continue
            rel = join(member.relpath, name)
            beneath = None
            for j in range(i + 1, n):
                beneath = visit.listings[j].get(name)
                if beneath is not None:
                    break
            if beneath is not None and not beneath.is_whiteout(xa):
                # It hides something: only its form can be wrong.
                if entry.is_xwhiteout(xa):
                    if member.layer.is_upper:
                        ctx.fix(Finding(
                            BY_CODE["OVL104"], member.layer, rel,
                            "readdir lists it while lookups say it does not exist",
                            ops=(Quarantine(member.layer, rel), MakeWhiteout(member.layer, rel)),
                            action="replace it with a 0/0 character-device whiteout",
                        ))
                    elif dir_x.get("opaque") != b"x":
                        unmarked_x.append(name)
                continue
            if beneath is not None:
                code, detail = "OVL101", f"{visit.members[j].layer.name} already has a whiteout there"
            elif opaque and i == n - 1:
                code, detail = "OVL102", "its directory is opaque"
            elif lowermost:
                code, detail = "OVL101", "nothing lies beneath the lowermost layer"
            elif n == 1 and not visit.hidden and "origin" not in dir_x:
                code, detail = "OVL103", "the directory has no lower counterpart; readdir will list it"
            else:
                code, detail = "OVL101", "no lower layer has that name"
            ctx.fix(Finding(
                BY_CODE[code], member.layer, rel, detail,
                ops=(Quarantine(member.layer, rel),), action="move the whiteout to the quarantine",
            ))
        if unmarked_x:
            shown = ", ".join(unmarked_x[:3]) + (" ..." if len(unmarked_x) > 3 else "")
            ctx.fix(Finding(
                BY_CODE["OVL105"], member.layer, member.relpath,
                f"{len(unmarked_x)} xattr whiteout(s): {shown}",
                ops=(SetXattr(member.layer, member.relpath, ctx.xname("opaque"), b"x"),),
                action="set opaque=x on the directory",
            ))
