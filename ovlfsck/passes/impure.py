"""impure: required on an upper directory holding an origin child, a redirected
directory or a merged directory (copy_up.c, dir.c, namei.c:ovl_fix_origin)."""
from __future__ import annotations

from ovlfsck.engine import CheckContext, Finding
from ovlfsck.fsio import maybe_special, quoted
from ovlfsck.problems import BY_CODE
from ovlfsck.repair import SetXattr
from ovlfsck.walk import DirVisit, join, validate_redirect


# walk.DirVisit.quiet: nothing for this pass (it looks at upper directories only).
QUIET_SKIP = True


def check(ctx: CheckContext, visit: DirVisit) -> None:
    if not visit.members or not visit.members[0].layer.is_upper:
        return
    top = visit.members[0]
    if ctx.xattrs_of(top.layer, top.relpath, top.entry).get("impure") == b"y":
        return
    reasons: list[str] = []
    listing = visit.listings[0]
    # Only an entry with xattrs or a directory can be a reason (an origin, a redirect, a
    # merge): those, when the listing knows them.
    names = maybe_special(listing)
    for name, entry in (listing.items() if names is None else [(n, listing[n]) for n in names]):
        if entry.is_chr_whiteout():
            continue
        x = ctx.xattrs_of(top.layer, join(top.relpath, name), entry)
        if "origin" in x:
            reasons.append(f"{quoted(name)} has an origin")
        elif entry.is_dir:
            if "redirect" in x and validate_redirect(x["redirect"])[0] is None:
                reasons.append(f"{quoted(name)} is a redirected directory")
            else:
                chain = visit.chains.get(name)
                if chain is not None and chain.is_merged and chain.members[0].entry is entry:
                    reasons.append(f"{quoted(name)} is a merged directory")
        if len(reasons) >= 3:
            break
    if reasons:
        ctx.fix(Finding(
            BY_CODE["OVL401"], top.layer, top.relpath, "; ".join(reasons),
            ops=(SetXattr(top.layer, top.relpath, ctx.xname("impure"), b"y"),),
            action="set impure=y",
        ))
