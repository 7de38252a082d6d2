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
from dataclasses import dataclass
from typing import Callable, Iterator, Optional

from ovlfsck import readahead
from ovlfsck.fsio import (
    NO_XATTRS, DevInfo, DirPrefix, Entry, Kind, Prefetcher, Xattrs, lstat_entry, maybe_special, quoted,
    scan_sorted, sort_names,
)
from ovlfsck.stack import Layer, Stack

# The kernel's default redirect_max module parameter.
REDIRECT_MAX = 256
MAX_MERGED_DEPTH = 2048

_DIR = Kind.DIR
_REG = Kind.REG
_LNK = Kind.LNK


def join(parent: str, name: str) -> str:
    return f"{parent}/{name}" if parent else name


def parent_of(path: str) -> str:
    return path.rpartition("/")[0]


def layer_name(layer: Layer) -> str:
    return layer.name  # a plain attribute (made once per Layer)


class Member:
    """One layer's object taking part in a merged object."""

    __slots__ = ("layer", "relpath", "entry", "via_redirect")

    def __init__(self, layer: Layer, relpath: str, entry: Entry, via_redirect: bool = False) -> None:
        self.layer = layer
        self.relpath = relpath  # layer-relative path, '' for the root
        self.entry = entry
        self.via_redirect = via_redirect

    @property
    def key(self) -> tuple[str, str]:
        return (layer_name(self.layer), self.relpath)

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Member):
            return NotImplemented
        return (self.layer == other.layer and self.relpath == other.relpath
                and self.entry is other.entry and self.via_redirect == other.via_redirect)

    __hash__ = None  # type: ignore[assignment]  # mutable, like the dataclass it was

    def __repr__(self) -> str:
        return (f"Member(layer={layer_name(self.layer)}, relpath={self.relpath!r}, "
                f"entry={self.entry!r}, via_redirect={self.via_redirect})")


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


_NO_REDIRECTS: tuple = ()


class Chain:
    """What looking up one name in a merged directory gives.

    `redirects` is an empty tuple (shared) until a redirect is met, then a list."""

    __slots__ = ("name", "members", "whiteout", "stop", "redirects")

    def __init__(self, name: str, members: Optional[list[Member]] = None,
                 whiteout: Optional[Member] = None, stop: Optional[str] = None,
                 redirects: Optional[list[RedirectEvent]] = None) -> None:
        self.name = name
        self.members = [] if members is None else members
        self.whiteout = whiteout  # the top entry is a whiteout: the name is deleted
        self.stop = stop  # 'whiteout' | 'opaque' | 'nondir' | 'invalid' | None
        self.redirects = _NO_REDIRECTS if redirects is None else redirects

    def __repr__(self) -> str:
        return (f"Chain(name={self.name!r}, members={self.members!r}, whiteout={self.whiteout!r}, "
                f"stop={self.stop!r}, redirects={list(self.redirects)!r})")

    @property
    def top(self) -> Optional[Member]:
        return self.members[0] if self.members else self.whiteout

    @property
    def is_dir(self) -> bool:
        members = self.members
        return bool(members) and members[0].entry.is_dir

    @property
    def is_merged(self) -> bool:
        return self.is_dir and len(self.members) > 1

    @property
    def straight(self) -> bool:
        return not any(m.via_redirect for m in self.members)


class Chains:
    """A merged directory's chains, {name: Chain} for every name of the union in byte order.

    Only the chains that need a lookup (a directory, a whiteout, an entry whose xattrs or
    type are not known to be plain) are built by the walk; a name whose first entry is a
    plain file or symlink (most names) gets its one-member chain when it is asked for, and
    keeps it. The union's order and each name's first listing are worked out only when
    something asks for them (most directories: nothing does). Reads like a dict."""

    __slots__ = ("_ordered", "_built", "_listings", "_members")

    def __init__(self, built: dict[str, Chain], listings: list[dict[str, Entry]],
                 members: list[Member]) -> None:
        self._ordered: Optional[list[str]] = None  # the union in byte order, once asked for
        self._built = built
        self._listings = listings
        self._members = members

    def _names(self) -> list[str]:
        ordered = self._ordered
        if ordered is None:
            listings = self._listings
            # a listing is in byte order already
            ordered = self._ordered = (list(listings[0]) if len(listings) == 1
                                       else sort_names(set().union(*listings)))
        return ordered

    def get(self, name: str, default=None):
        chain = self._built.get(name)
        if chain is not None:
            return chain
        listings = self._listings
        i = None
        for k, lst in enumerate(listings):
            if name in lst:
                i = k
                break
        if i is None:
            return default
        m = self._members[i]
        prel = m.relpath
        chain = self._built[name] = Chain(
            name, [Member(m.layer, f"{prel}/{name}" if prel else name, listings[i][name])])
        return chain

    def __getitem__(self, name: str) -> Chain:
        chain = self.get(name)
        if chain is None:
            raise KeyError(name)
        return chain

    def __contains__(self, name: object) -> bool:
        if name in self._built:
            return True
        return any(name in lst for lst in self._listings)

    def __iter__(self):
        return iter(self._names())

    def __len__(self) -> int:
        return len(self._names())

    def keys(self) -> list[str]:
        return list(self._names())

    def items(self):
        get = self.get
        return [(name, get(name)) for name in self._names()]

    def values(self):
        get = self.get
        return [get(name) for name in self._names()]

    def built_map(self) -> dict[str, Chain]:
        """{name: Chain} of the chains built so far (see `built`)."""
        return self._built

    def built(self):
        """The chains built so far: every one that met a lookup beneath its first entry
        (redirects, directories, whiteouts) is among them."""
        return self._built.values()

    def __eq__(self, other: object) -> bool:
        if isinstance(other, (Chains, dict)):
            return dict(self.items()) == dict(other.items())
        return NotImplemented

    __hash__ = None  # type: ignore[assignment]

    def __repr__(self) -> str:
        return f"Chains({dict(self.items())!r})"


def _quiet(path: str, members: list[Member], listings: list, hidden: bool, straight: bool,
           redirected: Optional[list[str]]) -> bool:
    """A directory below the root, not hidden, reached without a redirect, of lower layers
    only, whose every listing knows its special entries and has none, and whose every layer
    directory is known to have no overlay xattrs."""
    if not path or hidden or not straight or redirected or not members or members[0].layer.is_upper:
        return False
    for m, lst in zip(members, listings):
        if getattr(lst, "special", None) != []:
            return False
        x = m.entry._xattrs
        if x is None or x:
            return False
    return True


# A directory with more subdirectories than this keeps them packed while they wait.
PACK_WIDTH = 256


class _Frame:
    """What the packed subdirectories of one directory share: its members, and per member
    the DirPrefix and st_dev its listing gave its entries."""

    __slots__ = ("path", "hidden", "members", "index", "prefixes", "devs")

    def __init__(self, path: str, members: list[Member], hidden: bool) -> None:
        self.path = path
        self.hidden = hidden
        self.members = members
        self.index = {id(m.layer): i for i, m in enumerate(members)}
        self.prefixes: list = [None] * len(members)
        self.devs: list = [None] * len(members)

    def pack(self, name: str, cm: list[Member], straight: bool) -> "Optional[_Packed]":
        """The walk's pending item for subdirectory `name` with members `cm`, as (frame,
        name, straight, where, with_x, xattrs...): bit i of `where` set when the member
        is in the directory of parent member i (members in parent order); bit k of `with_x`
        when the k-th member's xattrs are not NO_XATTRS, which then follow in order. None if
        any member is not what unpack() makes again (a redirect, a stat or d_ino already
        read, an entry not from a listing of the parent)."""
        where = with_x = 0
        xs: list = []
        last = -1
        index, members, prefixes, devs = self.index, self.members, self.prefixes, self.devs
        for k, m in enumerate(cm):
            e = m.entry
            i = index.get(id(m.layer))
            if (i is None or i <= last or type(m) is not Member or m.via_redirect
                    or type(e) is not Entry or e.kind is not _DIR or e._stat is not None
                    or e.ino is not None or e.name != name or type(e._path) is not DirPrefix):
                return None
            last = i
            prefix = prefixes[i]
            if prefix is None:
                prefix = prefixes[i] = e._path
                devs[i] = e.dev
            if e._path is not prefix or e.dev != devs[i]:
                return None
            prel = members[i].relpath
            if m.relpath != (f"{prel}/{name}" if prel else name):
                return None
            where |= 1 << i
            x = e._xattrs
            if x is not NO_XATTRS:
                with_x |= 1 << k
                xs.append(x)
        return _Packed((self, name, straight, where, with_x, *xs))


class _Packed(tuple):
    """A waiting subdirectory, packed (see _Frame.pack): ~90 bytes instead of ~700 (its
    path, a tuple, and a Member, an Entry and a list per layer). unpack() gives the
    pending item (path, members, straight, hidden) with Members equal to the packed ones."""

    __slots__ = ()

    def unpack(self) -> tuple[str, list[Member], bool, bool]:
        frame, name, straight, where, with_x = self[:5]
        parents, prefixes, devs = frame.members, frame.prefixes, frame.devs
        out = []
        j = 5
        k = 0
        for i in range(len(parents)):
            if not where >> i & 1:
                continue
            if with_x >> k & 1:
                x = self[j]
                j += 1
            else:
                x = NO_XATTRS
            k += 1
            pm = parents[i]
            prel = pm.relpath
            entry = Entry(name, None, _DIR, None, x, None, devs[i], prefixes[i])
            out.append(Member(pm.layer, f"{prel}/{name}" if prel else name, entry))
        return join(frame.path, name), out, straight, frame.hidden


def add_one_or_more(mapping: dict, key, item) -> None:
    """Add `item` under `key` in a map kept to the end of a walk: the item itself while it
    is the only one (most keys), a list once there are more. Items must not be lists."""
    prev = mapping.get(key)
    if prev is None:
        mapping[key] = item
    elif type(prev) is list:
        prev.append(item)
    else:
        mapping[key] = [prev, item]


def one_or_more(value) -> list:
    """The items of an add_one_or_more value (None: none)."""
    if value is None:
        return []
    return value if type(value) is list else [value]


class Claim:
    """A directory whose redirect reached a lower directory: its layer and relpath, the
    merged path the redirect gave, and its origin xattr as read then (or None)."""

    __slots__ = ("layer", "relpath", "merged", "origin")

    def __init__(self, layer: Layer, relpath: str, merged: str, origin: Optional[bytes]) -> None:
        self.layer = layer
        self.relpath = relpath
        self.merged = merged
        self.origin = origin

    @property
    def key(self) -> tuple[str, str]:
        return (layer_name(self.layer), self.relpath)

    def __repr__(self) -> str:
        return f"Claim({layer_name(self.layer)}:{self.relpath!r} as {self.merged!r})"


@dataclass
class DirVisit:
    """One merged directory, with the listing of each contributing layer directory.

    A visit is for the passes while it is the walk's current one: when the walk resumes,
    its subdirectories' chains leave `chains` for the walk's stack (a wide directory's
    members would otherwise be kept twice while it packs them)."""

    path: str  # merged path ('' root); in a hidden walk, the path in that sub-stack
    members: list[Member]
    listings: list[dict[str, Entry]]
    chains: "Chains | dict[str, Chain]"  # every name of the union, resolved
    hidden: bool = False  # a sub-stack walk below a hidden lower directory
    straight: bool = True  # no redirect on the way here
    # The names (in order) whose chain met a redirect; None: not known, look at every chain.
    redirected: Optional[list[str]] = None
    # Nothing here but plain entries of lower layers, known so (see _quiet): the passes
    # that look only at special entries, directories' xattrs, redirects or the upper layer
    # (QUIET_SKIP in their module) have nothing to do.
    quiet: bool = False

    def member_index(self, layer: Layer) -> Optional[int]:
        for i, m in enumerate(self.members):
            if m.layer is layer or m.layer == layer:
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


def _plain(entry: Entry) -> bool:
    """A symlink, or a regular file known not to be an xattr whiteout: its chain is itself
    (no lookup beneath a non-directory)."""
    kind = entry.kind
    if kind is _LNK:
        return True
    if kind is not _REG:
        return False
    x = entry._xattrs
    return x is NO_XATTRS or (x is not None and "whiteout" not in x)


class Walker:
    """Resolves chains and yields DirVisits, depth first, names in byte order."""

    # Entries listed before the prefetch child is started: small layer sets (most tests,
    # small containers) are done before a child would have paid for itself.
    PREFETCH_AFTER = 1000
    LOOKUPS_KEPT = 64  # see _lookups (each holds a few Members with their stat and xattrs)

    def __init__(self, stack: Stack, xa: Xattrs, on_error: Callable[[Layer, str, OSError], None],
                 prefetch: bool = False):
        self.stack = stack
        self.xa = xa
        self.layers = stack.namespace_layers
        self.lowermost_depth = self.layers[-1].depth
        self.on_error = on_error
        # (layer name, relpath) of lower directories reached through a redirect -> its
        # claimants: a Claim, or a list of them when there are several. Kept to the end of
        # the walk, so compact: no Member or Entry of the owner.
        self.claims: dict[tuple[str, str], "Claim | list[Claim]"] = {}
        # (layer, relpath) of lower directories hidden in the merged view, for the hidden
        # walk (their entries are looked up again then: kept to the end of the main walk).
        self.hidden_roots: list[tuple[Layer, str]] = []
        self.visited_hidden: set[tuple[str, str]] = set()
        self.pending_dirs = 0  # merged directories known but not visited yet (for progress)
        self.devinfo = DevInfo([lay.path for lay in self.layers])
        # The prefetch child (fsio.Prefetcher): listings and xattrs read ahead of the walk on
        # the other core; only for runs that write nothing (what it read cannot go stale).
        # The walk gives the same result with or without it. OVLFSCK_PREFETCH=0 turns it
        # off, =1 starts it at once.
        self.prefetcher: Optional[Prefetcher] = None
        self.readahead = None  # the readahead child, started with the prefetch child
        self._prefetch_after: Optional[int] = None
        if prefetch:
            env = os.environ.get("OVLFSCK_PREFETCH", "")
            if env != "0":
                self._prefetch_after = 0 if env == "1" else self.PREFETCH_AFTER
        self._listed = 0
        self._seen: Optional[dict[str, str]] = None  # see _walk
        self._roots: Optional[list[tuple[Layer, str, os.stat_result]]] = None
        # lookup_merged's intermediate directories: (top layer's depth or -1, "a/b") ->
        # (members, straight), while nothing that a lookup reads can have changed (until
        # close(): the engine calls it before any write but an in-place origin rewrite,
        # which no lookup reads). Bounded (emptied when full): the lookups that share
        # parents come one after the other (the hidden walk's starts are sorted).
        self._lookups: Optional[dict[tuple[int, str], tuple[list[Member], bool]]] = {}

    # ------------------------------------------------------------------ listing

    def listing(self, member: Member, wait: bool = False, keep: bool = False) -> dict[str, Entry]:
        """One layer directory's entries in byte order ({} if it cannot be listed: reported).
        `wait`: the directory is on the walk's own pre-order path (the prefetch child's
        order), so waiting for the child's record is better than reading it twice; `keep`:
        it may be listed again (a hidden sub-stack)."""
        entry = member.entry
        devinfo = self.devinfo
        dev = devinfo.dir_dev(entry, entry.dev)
        pf = self.prefetcher
        if pf is None and self._prefetch_after is not None and (
                self._listed >= self._prefetch_after or self._big_roots()):
            self._prefetch_after = None
            pf = self.prefetcher = Prefetcher.start(self.layers, self.xa)
            # On a cold page cache, ext4 metadata read ahead in large reads (readahead.py).
            self.readahead = readahead.start([lay.path for lay in self.layers])
        if pf is not None:
            pf.names = self._seen
            got = pf.listing(member.layer, member.relpath, entry.path, dev, devinfo.mountpoints,
                             wait, keep)
            if got is not None:
                return got
        try:
            got = scan_sorted(entry.path, dev, devinfo.mountpoints)
            self._listed += len(got)
            return got
        except OSError as exc:
            self.on_error(member.layer, member.relpath, exc)
            return {}

    def _big_roots(self) -> bool:
        """A layer root with many subdirectories or a large directory file: start the
        prefetch child before the first listing (the roots are the first directories
        listed, and on a large layer set the largest)."""
        self.root_members()
        return any(st.st_nlink > 66 or st.st_size > (64 << 10) for _l, _n, st in self._roots)

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
        members = chain.members
        xa = self.xa
        lowermost_depth = self.lowermost_depth
        cur_name = name
        abs_comps: Optional[list[str]] = None
        via_redirect = False
        last_depth = -1
        pending: Optional[RedirectEvent] = None
        owner: Optional[Member] = None  # the directory whose redirect led here
        idx = 0
        n_parents = len(parent_members)
        while True:
            # Next candidate: the parent's members (relative mode) or every layer
            # beneath (absolute mode), in order.
            if abs_comps is None:
                if idx >= n_parents:
                    break
                pm = parent_members[idx]
                idx += 1
                layer = pm.layer
                depth = layer.depth
                if depth <= last_depth:
                    continue
                last_depth = depth
                if parent_listings is not None:
                    entry = parent_listings[idx - 1].get(cur_name)
                else:
                    entry = lstat_entry(os.path.join(pm.entry.path, cur_name))
                if entry is None:
                    continue
                prel = pm.relpath
                relpath = f"{prel}/{cur_name}" if prel else cur_name
                stop_here = False
            else:
                layer = None
                for lay in self.layers:
                    if lay.depth > last_depth:
                        layer = lay
                        break
                if layer is None:
                    break
                relpath = "/".join(abs_comps)
                entry, stop_here, abs_comps, bad, _ = self.lookup_path(layer, abs_comps)
                if bad is not None:
                    # An invalid redirect on the way fails the whole lookup (EINVAL).
                    chain.redirects = [*chain.redirects, bad]
                    chain.stop = "invalid"
                    break
                last_depth = layer.depth
                if entry is None:
                    if stop_here:
                        chain.stop = "opaque"
                        break
                    continue
            member = Member(layer, relpath, entry, via_redirect)
            kind = entry.kind
            if kind is not _DIR:
                if entry.is_whiteout(xa):
                    if not members:
                        chain.whiteout = member
                    chain.stop = "whiteout"
                    break
                if kind is not None or not entry.is_dir:
                    if not members:
                        members.append(member)
                    else:
                        chain.stop = "nondir"
                        if pending:
                            pending.problem, pending.detail = "notdir", f"{layer_name(layer)}:{relpath} is not a directory"
                            pending = None
                    break
            members.append(member)
            if pending:
                pending.target = member
                pending = None
            if register and via_redirect and owner is not None:
                self._claim(member.key, owner, join(merged_path, name))
            if layer.depth == lowermost_depth:
                break
            xattrs = entry._xattrs
            if xattrs is None:
                xattrs = entry.xattrs(xa)
            if not xattrs:
                if stop_here:
                    chain.stop = "opaque"
                    break
                continue
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
            chain.redirects = [*chain.redirects, event]
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

    def _claim(self, key: tuple[str, str], owner: Member, merged: str) -> None:
        x = owner.entry._xattrs
        if x is None:  # not so: its redirect was read from them
            x = owner.entry.xattrs(self.xa)
        claim = Claim(owner.layer, owner.relpath, merged, x.get("origin"))
        add_one_or_more(self.claims, key, claim)

    def claimants(self, key: tuple[str, str]) -> list["Claim"]:
        """The claims on the lower directory `key`, in the order they were made."""
        return one_or_more(self.claims.get(key))

    def lookup_merged(self, comps: list[str], top: Optional[Layer] = None) -> Chain:
        """Look up a whole path in the merged view (of the sub-stack from `top` down),
        component by component, with the kernel's rules (redirects of every directory on
        the way included). Point lookups only; nothing is registered as a claim."""
        memo = self._lookups
        tkey = -1 if top is None else top.depth
        start = 0
        members: Optional[list[Member]] = None
        if memo:
            # The deepest intermediate directory looked up before (the hidden walk's starts
            # and the redirects' old locations share most of their parents).
            k = len(comps) - 1
            while k > 0:
                got = memo.get((tkey, "/".join(comps[:k])))
                if got is not None:
                    members, straight = got
                    start = k
                    break
                k -= 1
        if members is None:
            members = [m for m in self.root_members() if top is None or m.layer.depth >= top.depth]
            straight = True
        path = "/".join(comps[:start])
        chain = Chain("")
        last = len(comps) - 1
        for i in range(start, last + 1):
            comp = comps[i]
            chain = self.resolve(comp, members, None, path, straight, register=False)
            if i == last:
                return chain
            if not chain.is_dir:
                return Chain(comps[-1])
            members = chain.members
            straight = straight and chain.straight
            path = join(path, comp)
            memo = self._lookups
            if memo is not None:
                if len(memo) >= self.LOOKUPS_KEPT:
                    memo.clear()
                memo[(tkey, path)] = (members, straight)
        return chain

    # ------------------------------------------------------------------ the walk

    def root_members(self) -> list[Member]:
        """The root merges every namespace layer (roots are never opaque). The roots are
        looked at once per walk; every call gets new Entries (nothing cached in them)."""
        if self._roots is None:
            self._roots = []
            for layer in self.layers:
                entry = lstat_entry(layer.path)
                if entry is not None and entry.is_dir:
                    self._roots.append((layer, entry.name, entry._stat))
        return [Member(layer, "", Entry(name, layer.path, _DIR, st)) for layer, name, st in self._roots]

    def visits(self) -> Iterator[DirVisit]:
        try:
            yield from self._walk([("", self.root_members(), True, False)])
            # Lower directories the merged view never reached: walk each as the top of the
            # sub-stack that starts at its layer, unless a redirect already took it in.
            while self.hidden_roots:
                roots, self.hidden_roots = self.hidden_roots, []
                roots.sort(key=lambda r: (r[0].depth, r[1].encode("utf-8", "surrogateescape")))
                todo: list[tuple[Layer, str]] = []
                for layer, rel in roots:
                    key = (layer_name(layer), rel)
                    if not (key in self.claims or key in self.visited_hidden):
                        self.visited_hidden.add(key)  # taken up once
                        todo.append((layer, rel))
                del roots
                # Starts in several layers at one relative path: the topmost one's chain
                # usually takes those beneath in (unless something between cuts it), and a
                # start reached so is walked with it, not again from its own layer: with n
                # layers sharing a hidden directory, n walks instead of n(n+1)/2. Their
                # chains are looked up first, for the child's plan (and again when walked:
                # kept, they would cost ~1.2 KB each, 1,439 of them at 1M).
                covered = self._shared_starts(todo)
                plan = [t for t in todo if (layer_name(t[0]), t[1]) not in covered]
                pf = self._prefetch_hidden(plan)
                plan_no = {(layer_name(lay), rel): n for n, (lay, rel) in enumerate(plan)}
                del plan, covered
                # What the walks reached (of the starts): their visits' members, so that
                # what the lookups above foresaw is checked, not assumed.
                starts = {(layer_name(lay), rel) for lay, rel in todo}
                reached: set[tuple[str, str]] = set()
                for layer, rel in todo:
                    key = (layer_name(layer), rel)
                    if key in self.claims or key in reached:
                        continue  # taken in by a redirect, or by a start above it
                    if pf is not None:
                        pf.start_no = plan_no.get(key, -1)  # -1: not in the child's plan
                    # Its chain in the sub-stack that starts at its own layer.
                    chain = self.lookup_merged(rel.split("/"), layer)
                    members = chain.members if chain.members and chain.members[0].key == key else None
                    del chain
                    if members is None:
                        path = os.path.join(layer.path, rel)
                        entry = lstat_entry(path) or Entry(os.path.basename(path), path, _DIR)
                        members = [Member(layer, rel, entry)]
                    for visit in self._walk([(rel, members, True, True)]):
                        for m in visit.members:
                            k = m.key
                            if k in starts:
                                reached.add(k)
                        yield visit
                        del visit  # (not held while the walker makes the next one)
                    del members
        finally:
            self.close()

    def _shared_starts(self, todo: list[tuple[Layer, str]]) -> set[tuple[str, str]]:
        """The starts that the chain of a start above them at the same relative path takes
        in (of the starts whose relative path is a start in another layer, the topmost
        first, each one that no earlier one's chain took in is looked up)."""
        count: dict[str, int] = {}
        for _layer, rel in todo:
            count[rel] = count.get(rel, 0) + 1
        covered: set[tuple[str, str]] = set()
        for layer, rel in todo:  # (by depth: the topmost of a relative path first)
            if count[rel] < 2:
                continue
            key = (layer_name(layer), rel)
            if key in covered or key in self.claims:
                continue
            members = self.lookup_merged(rel.split("/"), layer).members
            if members and members[0].key == key:
                covered.update(m.key for m in members[1:])
        return covered

    def _prefetch_hidden(self, todo: list[tuple[Layer, str]]) -> Optional[Prefetcher]:
        """A prefetch child for the hidden walk of `todo`, if the walk had one (a run that
        writes nothing, on a layer set large enough): the first child's records of these
        directories went by long ago (the walk reached them only now), and reading them here
        would cost this process what it costs the child on the other core."""
        pf = self.prefetcher
        if pf is None or pf.corrupt or not todo:
            return None
        pf.close()
        self.prefetcher = Prefetcher.start(self.layers, self.xa, todo)
        return self.prefetcher

    def close(self) -> None:
        """Stop the prefetch child, if any, and keep it from starting: the walk lists every
        directory itself from now on (at its end; or after a write, see engine)."""
        self._prefetch_after = None
        self._lookups = None  # (what they hold may change from now on)
        if self.prefetcher is not None:
            self.prefetcher.close()
            self.prefetcher = None
        proc, self.readahead = self.readahead, None
        readahead.stop(proc)

    def _chains(self, path: str, members: list[Member], listings: list[dict[str, Entry]],
                straight: bool) -> tuple[Chains, list[str], list[str]]:
        """The chains of the union's names, the names whose chain is a directory and those
        whose chain met a redirect.

        Only names whose first entry may not be plain (a listing's `special` and `dirs`, when
        it knows them; else every name) are looked at here: a directory goes through
        `resolve`, a whiteout or an unknown entry gets its chain. The others (plain files and
        symlinks: most names) need no lookup beneath them; `Chains` makes theirs on use."""
        built: dict[str, Chain] = {}
        dirs: list[str] = []
        redirected: list[str] = []
        if len(listings) == 1:
            # One layer directory (most directories): every name's first entry is its own.
            lst = listings[0]
            layer = members[0].layer
            prefix = members[0].relpath + "/" if members[0].relpath else ""
            cands = maybe_special(lst)
            for name in lst if cands is None else cands:
                entry = lst[name]
                if not _plain(entry):
                    self._chain(name, entry, layer, prefix, members, listings, path, straight,
                                built, dirs, redirected)
        else:
            # The names that may need a lookup, each with the first listing that has it
            # (the topmost layer's entry is the name's first).
            owned: dict[str, int] = {}
            for i, lst in enumerate(listings):
                names = maybe_special(lst)
                above = listings[:i]
                for n in (lst if names is None else names):
                    if n not in owned and not any(n in up for up in above):
                        owned[n] = i
            prefixes = [(m.layer, m.relpath + "/" if m.relpath else "") for m in members]
            for name in sort_names(owned):
                i = owned[name]
                entry = listings[i][name]
                if not _plain(entry):
                    layer, prefix = prefixes[i]
                    self._chain(name, entry, layer, prefix, members, listings, path, straight,
                                built, dirs, redirected)
        return Chains(built, listings, members), dirs, redirected

    def _chain(self, name: str, entry: Entry, layer: Layer, prefix: str, members: list[Member],
               listings: list[dict[str, Entry]], path: str, straight: bool,
               chains: dict[str, Chain], dirs: list[str], redirected: list[str]) -> None:
        """`_chains` for a name whose first entry may be a directory or a whiteout."""
        kind = entry.kind
        if kind is _DIR and entry._xattrs is NO_XATTRS and (
                len(listings) == 1 or sum(name in lst for lst in listings) == 1):
            # A directory without xattrs that no other layer directory here has (most
            # directories): its chain is itself, as `resolve` would find.
            chains[name] = Chain(name, [Member(layer, prefix + name, entry)])
            dirs.append(name)
            return
        if kind is _DIR or kind is None:
            chain = chains[name] = self.resolve(name, members, listings, path, straight)
            cm = chain.members
            if cm and cm[0].entry.is_dir:
                dirs.append(name)
            if chain.redirects:
                redirected.append(name)
            return
        member = Member(layer, prefix + name, entry)
        if entry.is_whiteout(self.xa):
            chains[name] = Chain(name, None, member, "whiteout")
        else:
            chains[name] = Chain(name, [member])

    def _walk(self, pending: list[tuple[str, list[Member], bool, bool]]) -> Iterator[DirVisit]:
        claims = self.claims
        while pending:
            self.pending_dirs = len(pending) - 1 + len(self.hidden_roots)
            item = pending.pop()
            if type(item) is _Packed:
                path, members, straight, hidden = item.unpack()
            else:
                path, members, straight, hidden = item
            del item
            # One str per directory name across this directory's layer listings.
            self._seen = {} if len(members) > 1 else None
            # Waiting for the child's record is right for a directory on its path ahead: the
            # walk's own pre-order, also in the hidden walk when the child reads its starts.
            pf = self.prefetcher
            ordered = not hidden or (pf is not None and pf.by_start)
            keep = hidden and not ordered
            del pf
            listings = [self.listing(m, ordered and m.relpath == path, keep) for m in members]
            self._seen = None
            if self.prefetcher is not None:
                self.prefetcher.names = None
            chains, dirs, redirected = self._chains(path, members, listings, straight)
            visit = DirVisit(path, members, listings, chains, hidden, straight, redirected,
                             _quiet(path, members, listings, hidden, straight, redirected))
            yield visit
            del visit
            self._remember_hidden(members, listings, chains)
            # The directories' chains are all built: the listings (and the entries that are
            # not directories) go before the children's are kept.
            built = chains.built_map()
            del listings, chains
            if path.count("/") < MAX_MERGED_DEPTH:
                # A wide directory's subdirectories wait packed (see _Packed).
                frame = _Frame(path, members, hidden) if len(dirs) > PACK_WIDTH else None
                for name in reversed(dirs):
                    # (out of `built`: what packs goes as it packs, not after the loop)
                    chain = built.pop(name)
                    cm = chain.members
                    if not (hidden and cm[0].key in claims):
                        child_straight = straight and chain.straight
                        packed = None
                        if frame is not None:
                            packed = frame.pack(name, cm, child_straight)
                        pending.append((join(path, name), cm, child_straight, hidden)
                                       if packed is None else packed)
                del frame
            # Only the children's members stay (in `pending`): the listings and chains of
            # this directory are freed before the next one is listed.
            del built, dirs, redirected

    def _remember_hidden(self, members: list[Member], listings: list[dict[str, Entry]],
                         chains: "Chains | dict[str, Chain]") -> None:
        """Lower directories hidden in a merged directory: remember them for the hidden
        walk. Reached means: in the chain of its own name, or reached through a redirect."""
        redirected = None
        for member, lst in zip(members, listings):
            if member.layer.is_upper:
                continue
            dirnames = getattr(lst, "dirs", None)
            if dirnames is not None:
                subdirs = ((name, lst[name]) for name in dirnames)
            else:
                subdirs = ((name, entry) for name, entry in lst.items()
                           if entry.kind is _DIR or (entry.kind is None and entry.is_dir))
            for name, entry in subdirs:
                chain = chains.get(name)
                if chain is not None:
                    for m in chain.members:  # (a loop: not any() of a generator, per subdir)
                        if m.entry is entry:
                            break
                    else:
                        m = None
                    if m is not None:
                        continue
                if redirected is None:
                    known = chains.built() if isinstance(chains, Chains) else chains.values()
                    redirected = {m.key for c in known if c.redirects
                                  for m in c.members if m.via_redirect}
                rel = join(member.relpath, name)
                if redirected and (layer_name(member.layer), rel) in redirected:
                    continue
                self.hidden_roots.append((member.layer, rel))
