"""The last resort for an indexed hardlink whose stale origin neither the record nor a path
names (issue 4): elimination among the lower hardlinks.

The case: a lower file with several names was copied up through one name, and that name was
then renamed away; another name still shows the lower file in the merged view, and the
index joins the two. After a copy of the layers without a record, nothing names the lower
inode: the origin and the index entry hold the old filesystem's inode number, and no path
leads from the upper file to it.

What is certain about that lower inode (overlay-format.md, index): with the index on, the
kernel copies a lower hardlink up (and indexes it) before any of its names is unlinked or
renamed away, and copy-up copies the data. So it is a lower inode that

- has the group's file type and at least two links;
- is named by no other handle (no origin, no rewrite of this run, no index entry);
- shows at least one name in the merged view (the alias the index joins) and hides at least
  one (the name it was copied up through, now a whiteout or covered);
- shows as many names as the group's `nlink` xattr leaves for lower aliases;
- holds the upper file's data (a regular file's bytes, a symlink's target, a device's
  number).

A group is placed only when exactly one lower inode passes for it and that inode passes for
no other group; a group whose file changed since the copy-up, or that two inodes fit, is left
(reported, never guessed).
"""
from __future__ import annotations

import os
import stat
from dataclasses import dataclass, field
from typing import Iterable, Optional

from ovlfsck.fsio import same_data, walk_tree
from ovlfsck.stack import Layer


@dataclass
class Group:
    """An unplaced indexed group: its upper file and what its nlink xattr says."""

    host: str  # an upper alias (the inode's data)
    st: os.stat_result
    n_upper: int  # upper aliases seen by the walk
    nlink: Optional[tuple[str, int]]  # parse_nlink of the xattr ('U'|'L', delta), or None


@dataclass
class Cand:
    """A lower inode with several links: its names in its layer, and which of them the
    merged view shows at their own path."""

    layer: Layer
    key: tuple[int, int]
    st: os.stat_result
    names: list[str] = field(default_factory=list)  # layer-relative
    host: str = ""  # the first name's host path
    visible: int = 0
    hidden: int = 0


def lower_hardlinks(layers: Iterable[Layer], modes: set[int]) -> list[Cand]:
    """Every inode of `layers` of a file type in `modes` (S_IFMT values) with st_nlink >= 2,
    with its names in the layer. One walk per layer; symlinks are never followed."""
    found: dict[tuple[int, int], Cand] = {}
    for layer in layers:
        for rel, de in walk_tree(layer.path):
            try:
                if de.is_dir(follow_symlinks=False):
                    continue
                s = de.stat(follow_symlinks=False)
            except OSError:
                continue
            if s.st_nlink < 2 or stat.S_IFMT(s.st_mode) not in modes:
                continue
            key = (s.st_dev, s.st_ino)
            c = found.get(key)
            if c is None:
                c = found[key] = Cand(layer, key, s)
            if c.layer is layer:
                c.names.append(rel)
    for c in found.values():
        c.names.sort(key=os.fsencode)
        c.host = os.path.join(c.layer.path, c.names[0])
    return list(found.values())


def fits(g: Group, c: Cand) -> bool:
    """Whether lower inode `c` can be the origin of group `g` (module docstring)."""
    if stat.S_IFMT(g.st.st_mode) != stat.S_IFMT(c.st.st_mode):
        return False
    if c.visible < 1 or c.hidden < 1:
        return False
    if g.nlink is not None:
        fmt, delta = g.nlink
        merged = (g.st.st_nlink if fmt == "U" else c.st.st_nlink) + delta
        if c.visible != merged - g.n_upper:
            return False
    return same_data(g.host, g.st, c.host, c.st)


def match(groups: list[Group], cands: list[Cand]) -> dict[int, Cand]:
    """{group index: its lower inode} for every group that exactly one candidate fits,
    when that candidate fits no other group."""
    fitting = [[c for c in cands if fits(g, c)] for g in groups]
    users: dict[tuple[int, int], int] = {}
    for f in fitting:
        for c in f:
            users[c.key] = users.get(c.key, 0) + 1
    return {i: f[0] for i, f in enumerate(fitting) if len(f) == 1 and users[f[0].key] == 1}
