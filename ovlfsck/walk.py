"""The merged-namespace walker.

For every directory of the merged view it does what the kernel's lookup does
(fs/overlayfs/namei.c: ovl_lookup, ovl_lookup_layer, ovl_lookup_single), once: one
scandir per contributing layer directory, then every name is resolved against those
listings in memory. A name's chain stops at a whiteout, an opaque directory or a
non-directory; redirects are followed (relative: another name in the parent's lower
directories; absolute: a path from the root of every layer beneath). The lowermost layer's
opaque and redirect xattrs are not read, as in the kernel.

Lower-layer directories that the merged view never reaches (beneath a whiteout, an opaque
directory or a file) are walked afterwards as the top of their own sub-stack, so lower
layers are checked completely; those reached through a redirect are not walked twice.

Memory: the pending stack holds the chains of the siblings along the current path; the
global maps grow with the number of redirects and hidden subtree roots, not of entries.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Callable, Iterator, Optional

from ovlfsck.fsio import Entry, Xattrs, lstat_entry, quoted, scan
from ovlfsck.stack import Layer, Stack

# The kernel's default redirect_max module parameter.
REDIRECT_MAX = 256
MAX_MERGED_DEPTH = 2048


def join(parent: str, name: str) -> str:
    return f"{parent}/{name}" if parent else name


def parent_of(path: str) -> str:
    return path.rpartition("/")[0]


@dataclass
class Member:
    """One layer's object taking part in a merged object."""

    layer: Layer
    relpath: str  # layer-relative path, '' for the root
    entry: Entry
    via_redirect: bool = False

    @property
    def key(self) -> tuple[str, str]:
        return (self.layer.name, self.relpath)


@dataclass
class RedirectEvent:
    """A redirect met while resolving a chain, and where it led."""

    member: Member  # the directory carrying the redirect
    value: bytes
    problem: Optional[str]  # None (ok) | 'malformed' | 'escapes' | 'dangling' | 'notdir'
    detail: str = ""
    target: Optional[Member] = None  # first lower directory reached through it
    absolute: bool = False
    self_redirect: bool = False


@dataclass
class Chain:
    """What looking up one name in a merged directory gives."""

    name: str
    members: list[Member] = field(default_factory=list)
    whiteout: Optional[Member] = None  # the top entry is a whiteout: the name is deleted
    stop: Optional[str] = None  # 'whiteout' | 'opaque' | 'nondir' | 'invalid' | None
    redirects: list[RedirectEvent] = field(default_factory=list)

    @property
    def top(self) -> Optional[Member]:
        return self.members[0] if self.members else self.whiteout

    @property
    def is_dir(self) -> bool:
        return bool(self.members) and self.members[0].entry.is_dir

    @property
    def is_merged(self) -> bool:
        return self.is_dir and len(self.members) > 1

    @property
    def straight(self) -> bool:
        return not any(m.via_redirect for m in self.members)


@dataclass
class DirVisit:
    """One merged directory, with the listing of each contributing layer directory."""

    path: str  # merged path ('' root); in a hidden walk, the path in that sub-stack
    members: list[Member]
    listings: list[dict[str, Entry]]
    chains: dict[str, Chain]  # every name of the union, resolved
    hidden: bool = False  # a sub-stack walk below a hidden lower directory
    straight: bool = True  # no redirect on the way here

    def member_index(self, layer: Layer) -> Optional[int]:
        for i, m in enumerate(self.members):
            if m.layer == layer:
                return i
        return None


def validate_redirect(value: bytes) -> tuple[Optional[str], str]:
    """(problem, detail) per the kernel's ovl_get_redirect_xattr, plus our confinement."""
    if len(value) == 0:
        return "malformed", "empty value"
    if b"\0" in value:
        return "escapes", "contains a NUL byte"
    if len(value) > REDIRECT_MAX:
        return "escapes", f"longer than redirect_max ({len(value)} > {REDIRECT_MAX} bytes)"
    if value.startswith(b"/"):
        comps = value[1:].split(b"/")
        if any(c == b"" for c in comps):
            return "malformed", "absolute path with an empty component"
    else:
        if b"/" in value:
            return "malformed", "relative value containing '/'"
        comps = [value]
    if any(c in (b".", b"..") for c in comps):
        return "escapes", "contains a '.' or '..' component"
    return None, ""


class Walker:
    """Resolves chains and yields DirVisits, depth first, names in byte order."""

    def __init__(self, stack: Stack, xa: Xattrs, on_error: Callable[[Layer, str, OSError], None]):
        self.stack = stack
        self.xa = xa
        self.layers = stack.namespace_layers
        self.lowermost_depth = self.layers[-1].depth
        self.on_error = on_error
        # (layer name, relpath) of lower directories reached through a redirect -> claimants
        self.claims: dict[tuple[str, str], list[tuple[Member, str]]] = {}
        self.hidden_roots: list[Member] = []
        self.visited_hidden: set[tuple[str, str]] = set()
        self.pending_dirs = 0  # merged directories known but not visited yet (for progress)

    # ------------------------------------------------------------------ listing

    def listing(self, member: Member) -> dict[str, Entry]:
        try:
            entries = {e.name: e for e in scan(member.entry.path)}
        except OSError as exc:
            self.on_error(member.layer, member.relpath, exc)
            return {}
        return dict(sorted(entries.items(), key=lambda kv: os.fsencode(kv[0])))

    def is_lowermost(self, layer: Layer) -> bool:
        return layer.depth == self.lowermost_depth

    def below(self, layer: Layer) -> list[Layer]:
        return [lay for lay in self.layers if lay.depth > layer.depth]

    # ------------------------------------------------------------------ lookups

    def lookup_path(
        self, layer: Layer, comps: list[str], read_xattrs: Optional[bool] = None,
    ) -> tuple[Optional[Entry], bool, list[str], Optional[RedirectEvent], Optional[bool]]:
        """Walk `comps` from the root of `layer` as ovl_lookup_layer does with an absolute
        name; returns (entry, stop, comps for the layers beneath, bad redirect or None,
        absolute-redirect flag as left by the intermediate directories (None: untouched)).

        - a missing component: (None, False): try the next layer;
        - a whiteout or a non-directory on the way: (None, True): no layer beneath either;
        - an opaque directory on the way: the walk in this layer goes on, but the layers
          beneath are not consulted (stop), unless a later absolute redirect resets it;
        - a redirect on an intermediate directory rewrites the name used in the layers
          beneath (ovl_check_redirect), while this layer's walk continues below it.
        The last component's own opaque and redirect are left to the caller.

        `read_xattrs` (default: not the lowermost layer) says whether the intermediate
        directories' opaque and redirect count (`d->last`; metacopy lookups with data-only
        layers decide it differently). Each intermediate directory also sets the kernel's
        absolute-redirect flag: True after an absolute redirect, False after a directory
        without one (which matters for the lazy data-only lookup).
        """
        cur = layer.path
        entry: Optional[Entry] = None
        stop = False
        flag: Optional[bool] = None
        comps = list(comps)
        if read_xattrs is None:
            read_xattrs = not self.is_lowermost(layer)
        i = 0
        while i < len(comps):
            cur = os.path.join(cur, comps[i])
            entry = lstat_entry(cur)
            if entry is None:
                return None, stop, comps, None, flag
            if entry.is_whiteout(self.xa):
                return None, True, comps, None, flag
            last = i == len(comps) - 1
            if last:
                break
            if not entry.is_dir:
                return None, True, comps, None, flag
            if read_xattrs:
                x = entry.xattrs(self.xa)
                if x.get("opaque") == b"y":
                    stop = True
                else:
                    value = x.get("redirect")
                    flag = bool(value and value.startswith(b"/"))
                    if value is None:
                        i += 1
                        continue
                    problem, detail = validate_redirect(value)
                    if problem:
                        rel = "/".join(comps[: i + 1])
                        bad = RedirectEvent(Member(layer, rel, entry), value, problem, detail)
                        return None, True, comps, bad, flag
                    text = os.fsdecode(value)
                    post = comps[i + 1 :]
                    if text.startswith("/"):
                        stop = False
                        comps = text[1:].split("/") + post
                    else:
                        comps = comps[:i] + [text] + post
                    i = len(comps) - len(post) - 1
            i += 1
        return entry, stop, comps, None, flag

    def resolve(
        self,
        name: str,
        parent_members: list[Member],
        parent_listings: Optional[list[dict[str, Entry]]],
        merged_path: str,
        straight: bool,
        register: bool = True,
    ) -> Chain:
        """The kernel's lookup of `name` in a merged directory made of `parent_members`.

        With `parent_listings` the entries come from those scandir results; without, each
        is a point lookup (lstat) in the member directory.
        """
        chain = Chain(name)
        cur_name = name
        abs_comps: Optional[list[str]] = None
        via_redirect = False
        last_depth = -1
        pending: Optional[RedirectEvent] = None
        owner: Optional[Member] = None  # the directory whose redirect led here
        idx = 0
        while True:
            # Next candidate: the parent's members (relative mode) or every layer
            # beneath (absolute mode), in order.
            if abs_comps is None:
                if idx >= len(parent_members):
                    break
                pm = parent_members[idx]
                idx += 1
                if pm.layer.depth <= last_depth:
                    continue
                layer = pm.layer
                if parent_listings is not None:
                    entry = parent_listings[idx - 1].get(cur_name)
                else:
                    entry = lstat_entry(os.path.join(pm.entry.path, cur_name))
                relpath = join(pm.relpath, cur_name)
                stop_here = False
                bad = None
            else:
                cands = [lay for lay in self.layers if lay.depth > last_depth]
                if not cands:
                    break
                layer = cands[0]
                relpath = "/".join(abs_comps)
                entry, stop_here, abs_comps, bad, _ = self.lookup_path(layer, abs_comps)
                if bad is not None:
                    # An invalid redirect on the way fails the whole lookup (EINVAL).
                    chain.redirects.append(bad)
                    chain.stop = "invalid"
                    break
            last_depth = layer.depth
            if entry is None:
                if stop_here:
                    chain.stop = "opaque"
                    break
                continue
            member = Member(layer, relpath, entry, via_redirect)
            if entry.is_whiteout(self.xa):
                if not chain.members:
                    chain.whiteout = member
                chain.stop = "whiteout"
                break
            if not entry.is_dir:
                if not chain.members:
                    chain.members.append(member)
                else:
                    chain.stop = "nondir"
                    if pending:
                        pending.problem, pending.detail = "notdir", f"{layer.name}:{relpath} is not a directory"
                        pending = None
                break
            chain.members.append(member)
            if pending:
                pending.target = member
                pending = None
            if register and via_redirect and owner is not None:
                self.claims.setdefault(member.key, []).append((owner, join(merged_path, name)))
            if self.is_lowermost(layer):
                break
            xattrs = entry.xattrs(self.xa)
            if xattrs.get("opaque") == b"y":
                chain.stop = "opaque"
                break
            value = xattrs.get("redirect")
            if value is None and stop_here:
                chain.stop = "opaque"
                break
            if value is None:
                continue
            problem, detail = validate_redirect(value)
            event = RedirectEvent(member, value, problem, detail, absolute=value.startswith(b"/"))
            chain.redirects.append(event)
            if problem:
                # ovl_check_redirect fails: the lookup of this name fails (EINVAL).
                chain.stop = "invalid"
                break
            text = os.fsdecode(value)
            if event.absolute:
                new_comps = text[1:].split("/")
                # `/X` on the directory X itself (left by a move away and back): the
                # redirect names the path a plain lookup would take anyway.
                event.self_redirect = straight and not via_redirect and new_comps == relpath.split("/")
                abs_comps = new_comps
            elif abs_comps is not None:
                event.self_redirect = abs_comps[-1] == text
                abs_comps = abs_comps[:-1] + [text]
            else:
                event.self_redirect = text == cur_name
                cur_name = text
            via_redirect = True
            pending = event
            owner = member
            if stop_here and not event.absolute:
                # An opaque ancestor in this layer stopped the lookup; only an absolute
                # redirect would have resumed it.
                chain.stop = "opaque"
                pending = None
                break
        if pending and pending.problem is None:
            pending.problem = "dangling"
            pending.detail = f"no directory {quoted(os.fsdecode(pending.value))} in the layers beneath"
        return chain

    def lookup_merged(self, comps: list[str], top: Optional[Layer] = None) -> Chain:
        """Look up a whole path in the merged view (of the sub-stack from `top` down),
        component by component, with the kernel's rules (redirects of every directory on
        the way included). Point lookups only; nothing is registered as a claim."""
        members = [m for m in self.root_members() if top is None or m.layer.depth >= top.depth]
        path = ""
        straight = True
        chain = Chain("")
        for i, comp in enumerate(comps):
            chain = self.resolve(comp, members, None, path, straight, register=False)
            if i == len(comps) - 1:
                return chain
            if not chain.is_dir:
                return Chain(comps[-1])
            members = chain.members
            straight = straight and chain.straight
            path = join(path, comp)
        return chain

    # ------------------------------------------------------------------ the walk

    def root_members(self) -> list[Member]:
        """The root merges every namespace layer (roots are never opaque)."""
        members = []
        for layer in self.layers:
            entry = lstat_entry(layer.path)
            if entry is not None and entry.is_dir:
                members.append(Member(layer, "", entry))
        return members

    def visits(self) -> Iterator[DirVisit]:
        yield from self._walk([("", self.root_members(), True, False)])
        # Lower directories the merged view never reached: walk each as the top of the
        # sub-stack that starts at its layer, unless a redirect already took it in.
        while self.hidden_roots:
            roots, self.hidden_roots = self.hidden_roots, []
            for m in sorted(roots, key=lambda m: (m.layer.depth, os.fsencode(m.relpath))):
                if m.key in self.claims or m.key in self.visited_hidden:
                    continue
                self.visited_hidden.add(m.key)
                # Its chain in the sub-stack that starts at its own layer.
                chain = self.lookup_merged(m.relpath.split("/"), m.layer)
                members = chain.members if chain.members and chain.members[0].key == m.key else [m]
                yield from self._walk([(m.relpath, members, True, True)])

    def _walk(self, pending: list[tuple[str, list[Member], bool, bool]]) -> Iterator[DirVisit]:
        while pending:
            self.pending_dirs = len(pending) - 1 + len(self.hidden_roots)
            path, members, straight, hidden = pending.pop()
            listings = [self.listing(m) for m in members]
            names: dict[str, None] = {}
            for lst in listings:
                names.update(dict.fromkeys(lst))
            ordered = sorted(names, key=os.fsencode)
            chains = {n: self.resolve(n, members, listings, path, straight) for n in ordered}
            visit = DirVisit(path, members, listings, chains, hidden, straight)
            yield visit
            # Lower directories hidden in this merged directory: remember them.
            in_chain = {m.key for c in chains.values() for m in c.members}
            for member, lst in zip(members, listings):
                if member.layer.is_upper:
                    continue
                for name, entry in lst.items():
                    key = (member.layer.name, join(member.relpath, name))
                    if key in in_chain or not entry.is_dir:
                        continue
                    self.hidden_roots.append(Member(member.layer, key[1], entry))
            if path.count("/") >= MAX_MERGED_DEPTH:
                continue
            children = []
            for name in reversed(ordered):
                chain = chains[name]
                if chain.is_dir and not (hidden and chain.members[0].key in self.claims):
                    children.append((join(path, name), chain.members, straight and chain.straight, hidden))
            pending.extend(children)
