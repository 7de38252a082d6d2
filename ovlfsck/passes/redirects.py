"""Redirects: format, confinement, dangling, non-directory targets, self redirects,
the cover whiteout at the old location, and duplicate claims on one lower directory.

Duplicates are resolved by evidence, never by directory read order: the directory whose
origin file handle matches the lower directory keeps the claim.
"""
from __future__ import annotations

import os
from typing import Optional

from ovlfsck import handles
from ovlfsck.engine import CheckContext, Finding
from ovlfsck.fsio import quoted
from ovlfsck.fsio import Entry
from ovlfsck.problems import BY_CODE
from ovlfsck.repair import MakeDir, MakeWhiteout, RemoveXattr, SetXattr
from ovlfsck.walk import Chain, Claim, DirVisit, Member, RedirectEvent, parent_of

_PROBLEM_CODES = {
    "malformed": "OVL301",
    "escapes": "OVL302",
    "dangling": "OVL303",
    "notdir": "OVL304",
}


# walk.DirVisit.quiet: nothing for this pass (it looks at directories' redirect xattrs and at
# chains that met a redirect only).
QUIET_SKIP = True


def check(ctx: CheckContext, visit: DirVisit) -> None:
    for member in visit.members:
        if member.relpath and ctx.walker.is_lowermost(member.layer) and "redirect" in member.entry.xattrs(ctx.xa):
            value = member.entry.xattrs(ctx.xa)["redirect"]
            _remove(ctx, "OVL309", member, f"value {value!r}", visit)
    chains = visit.chains
    names = chains if visit.redirected is None else visit.redirected
    for name in names:
        chain = chains[name]
        for event in chain.redirects:
            _check_event(ctx, visit, name, chain, event)


def _shown(value: bytes) -> str:
    return repr(os.fsdecode(value)) if len(value) <= 80 else repr(os.fsdecode(value[:80])) + "..."


def _check_event(ctx: CheckContext, visit: DirVisit, name: str, chain: Chain, ev: RedirectEvent) -> None:
    member = ev.member
    if ev.problem:
        code = _PROBLEM_CODES[ev.problem]
        _remove(ctx, code, member, f"redirect {_shown(ev.value)}: {ev.detail}", visit, name)
        return
    if ev.self_redirect:
        ctx.fix(Finding(
            BY_CODE["OVL305"], member.layer, member.relpath, f"redirect {_shown(ev.value)}",
            ops=(RemoveXattr(member.layer, member.relpath, ctx.xname("redirect")),),
            action="remove the redirect xattr",
        ))
        return
    if ev.target is None:
        return
    _check_cover(ctx, visit, name, ev)


def _remove(ctx: CheckContext, code: str, member: Member, detail: str, visit: DirVisit, name: Optional[str] = None) -> None:
    """Remove a redirect; then offer to make the directory opaque if it would now merge."""
    fixed = ctx.fix(Finding(
        BY_CODE[code], member.layer, member.relpath, detail,
        ops=(RemoveXattr(member.layer, member.relpath, ctx.xname("redirect")),),
        action="remove the redirect xattr",
    ))
    if not fixed or name is None or ctx.walker.is_lowermost(member.layer):
        return
    # Without its redirect the directory merges with a same-name directory beneath.
    i = visit.member_index(member.layer)
    if i is None:
        return
    for j in range(i + 1, len(visit.members)):
        below = visit.listings[j].get(name)
        if below is not None:
            if below.is_dir and not below.is_whiteout(ctx.xa):
                ctx.choose(Finding(
                    BY_CODE["OVL311"], member.layer, member.relpath,
                    f"{visit.members[j].layer.name} has a directory of the same name",
                    ops=(SetXattr(member.layer, member.relpath, ctx.xname("opaque"), b"y"),),
                    action="set opaque=y so it does not merge with it",
                ))
            return


def _cover_comps(member: Member, ev: RedirectEvent) -> list[str]:
    text = os.fsdecode(ev.value)
    if ev.absolute:
        return text[1:].split("/")
    parent = parent_of(member.relpath)
    return (parent.split("/") if parent else []) + [text]


def _check_cover(ctx: CheckContext, visit: DirVisit, name: str, ev: RedirectEvent) -> None:
    member, target = ev.member, ev.target
    assert target is not None
    if not ev.absolute and visit.member_index(member.layer) is not None:
        # Same parent: the old name's own chain in this very directory tells.
        old = visit.chains.get(os.fsdecode(ev.value))
        reached = old is not None and any(m.key == target.key for m in old.members)
        own = visit.listings[visit.member_index(member.layer)].get(os.fsdecode(ev.value))
    else:
        # Where the directory was renamed from, looked up the way the kernel would.
        comps = _cover_comps(member, ev)
        old = ctx.walker.lookup_merged(comps, member.layer)
        reached = any(m.key == target.key for m in old.members)
        own = old.members[0].entry if old.members and old.members[0].layer == member.layer else None
    if not reached:
        return
    comps = _cover_comps(member, ev)
    cover = "/".join(comps)
    if cover == member.relpath:
        return  # the old location is the directory itself
    if own is None:
        ops = tuple(_missing_parents(ctx, member, comps)) + (MakeWhiteout(member.layer, cover),)
        ctx.fix(Finding(
            BY_CODE["OVL306"], member.layer, cover,
            f"{quoted(member.relpath)} was renamed from here (redirect {_shown(ev.value)}), "
            f"but {target.layer.name}:{target.relpath} is still visible here too",
            ops=ops, action=f"create a whiteout at {quoted(cover)}",
        ))
        return
    _resolve_still_merged(ctx, member, target, cover, own, ev)


def _missing_parents(ctx: CheckContext, member: Member, comps: list[str]):
    """MakeDir ops for parents of the cover path missing in the redirect's layer."""
    for k in range(1, len(comps)):
        rel = "/".join(comps[:k])
        if os.path.lexists(os.path.join(member.layer.path, rel)):
            continue
        mode, uid, gid = 0o755, 0, 0
        for layer in ctx.walker.below(member.layer):
            try:
                st = os.lstat(os.path.join(layer.path, rel))
            except OSError:
                continue
            mode, uid, gid = st.st_mode & 0o7777, st.st_uid, st.st_gid
            break
        yield MakeDir(member.layer, rel, mode, uid, gid)


def _origin_matches(ctx: CheckContext, entry: Entry, target: Member) -> Optional[bool]:
    """Does `entry`'s origin encode `target`? None if it cannot be told."""
    return _raw_origin_matches(ctx, entry.xattrs(ctx.xa).get("origin"), target)


def _raw_origin_matches(ctx: CheckContext, raw: Optional[bytes], target: Member) -> Optional[bool]:
    """Does the origin xattr value `raw` encode `target`? None if it cannot be told."""
    if not raw:
        return False
    try:
        stored = handles.decode(raw)
    except (handles.HandleError, handles.UnknownHandle):
        return False
    real = ctx.handle_of(target.layer, target.entry.path)
    if real is None:
        return None
    return stored.same_object(real)


def _resolve_still_merged(ctx, member: Member, target: Member, cover: str, own: Entry, ev) -> None:
    r_match = _origin_matches(ctx, member.entry, target)
    p_match = _origin_matches(ctx, own, target)
    detail = (
        f"{quoted(member.relpath)} redirects to {target.layer.name}:{target.relpath} "
        f"(redirect {_shown(ev.value)}), which {quoted(cover)} still merges"
    )
    remove = RemoveXattr(member.layer, member.relpath, ctx.xname("redirect"))
    if r_match and not p_match:
        ctx.fix(Finding(
            BY_CODE["OVL308"], member.layer, cover, detail + "; the origin handle says the rename is real",
            ops=(SetXattr(member.layer, cover, ctx.xname("opaque"), b"y"),),
            action=f"make {quoted(cover)} opaque so it stops merging the renamed directory",
            compat=("Should set opaque dir", ""),
        ))
    elif p_match and not r_match:
        ctx.fix(Finding(
            BY_CODE["OVL308"], member.layer, member.relpath,
            detail + f"; the origin handle of {quoted(cover)} matches, the redirect's does not",
            ops=(remove,), action=f"remove the redirect from {quoted(member.relpath)}",
        ))
    else:
        ctx.fix(Finding(
            BY_CODE["OVL308"], member.layer, member.relpath,
            detail + "; the origin handles do not tell which is right",
            ops=(remove,), preen_ok=False,
            action=f"remove the redirect from {quoted(member.relpath)} (no evidence either way)",
        ))


def finish(ctx: CheckContext) -> None:
    for key in sorted(ctx.walker.claims, key=lambda k: (k[0], os.fsencode(k[1]))):
        claimants: dict[tuple[str, str], Claim] = {}
        for claim in ctx.walker.claimants(key):
            claimants.setdefault(claim.key, claim)
        if len(claimants) < 2:
            continue
        owners = [(c, c.merged) for c in sorted(claimants.values(), key=lambda c: os.fsencode(c.merged))]
        target_layer = ctx.stack.layer_by_name(key[0])
        target_path = os.path.join(target_layer.path, key[1]) if key[1] else target_layer.path
        target = Member(target_layer, key[1], Entry(os.path.basename(target_path), target_path, None))
        matches = [(_raw_origin_matches(ctx, o.origin, target), o, p) for o, p in owners]
        good = [t for t in matches if t[0]]
        names = ", ".join(quoted(p) for _, p in owners)
        both = "both" if len(owners) == 2 else "all"
        base = f"{names} {both} redirect to {key[0]}:{key[1]}"
        if len(good) == 1:
            keeper = good[0][1]
            losers = [(o, p) for m, o, p in matches if o is not keeper]
            why = f"; the origin handle of {quoted(good[0][2])} matches it"
            preen = True
        else:
            keeper = owners[0][0]
            losers = owners[1:]
            why = "; the origin handles do not tell which is right"
            preen = False
        for owner, path in losers:
            ctx.fix(Finding(
                BY_CODE["OVL307"], owner.layer, owner.relpath, base + why,
                ops=(RemoveXattr(owner.layer, owner.relpath, ctx.xname("redirect")),),
                preen_ok=preen,
                action=f"remove the redirect from {quoted(owner.relpath)}, keep {quoted(keeper.relpath)}",
            ))
