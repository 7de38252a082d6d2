"""Catalog rows for index entries and the nlink xattr (OVL601 stays in problems.py) (codes OVL602-OVL699). See problems.py for the row fields.

What the kernel does with each kind was measured on 6.18 (overlay-format.md §9.4, §9.5 and
the experiments quoted in the rows); "at mount" means ovl_indexdir_cleanup at every
index=on read-write mount.
"""
from __future__ import annotations

from ovlfsck.problems import Problem, Severity  # noqa: F401

_P = Problem

ROWS: tuple[Problem, ...] = (
    _P(
        "OVL602", "index-origin-mismatch", Severity.ERROR,
        "index entry whose name does not match its origin",
        "Move the entry to the quarantine", True,
        "Removed at mount: `failed to verify index (index/%s, ftype=%x, err=-116)` (H6, H18c). "
        "Until then a lower alias of the object the name encodes would find it.",
        "An index entry is named by the hex of the origin file handle of the lower object it "
        "stands for; for a file the entry's own `origin` xattr (the same inode as its upper "
        "aliases), for a directory the `origin` of the upper directory its `upper` xattr "
        "names. When the two differ the kernel deletes the entry at the next mount. The fix "
        "moves it to the quarantine instead; upper aliases keep their data either way.",
    ),
    _P(
        "OVL603", "index-missing-origin", Severity.ERROR,
        "index entry (or the upper directory it names) without a usable origin",
        "Restore the origin, or move the entry to the quarantine", True,
        "Mount fails: `failed to verify index (index/%s, ftype=%x, err=-61)`, `failed index "
        "dir cleanup (-61)`, `try deleting index dir or mounting with '-o index=off' to "
        "disable inodes index.` (H4)",
        "A file entry must carry `origin` (missing, empty, malformed or of an unknown version "
        "all count as none); so must the upper directory a directory entry's `upper` names. "
        "For a file entry whose name decodes to a lower object of the same type, the fix "
        "writes the name's handle back as `origin` (what copy-up wrote; the upper aliases "
        "share the inode, so they get it back too). Otherwise the entry goes to the "
        "quarantine: a directory entry holds no data and the kernel re-adds the upper "
        "directory's origin at lookup; a file entry without an upper alias holds the only copy "
        "of its data, so that case is not fixed under -p.",
    ),
    _P(
        "OVL604", "index-not-upper-inode", Severity.ERROR,
        "index entry is not the same inode as the upper file that carries its origin",
        "Move the entry to the quarantine", True,
        "The upper file's lookup ignores an index of another inode, so the hardlink is broken; "
        "with its only link left the entry is an orphan at mount: removed, or with nfs_export "
        "whited out, after which every lookup of the upper file fails with EIO: `orphan index "
        "entry (…)`, `bad index found (index=…, ftype=2000, origin ftype=8000)` (G6, measured).",
        "Copy-up links the upper file to its index entry (one inode). Copying the upper and "
        "work directories separately (`cp -a`, rsync) makes two files. The upper file is what "
        "the merged view shows, so the fix moves the separate index copy to the quarantine. "
        "Lower hardlinks of the object that are still visible were served by that copy; after "
        "the fix they show their lower content, so that case is not fixed under -p. "
        "(Re-linking the index entry to the upper file would keep them; it needs a link "
        "operation ovlfsck does not have yet.)",
    ),
    _P(
        "OVL605", "index-orphan", Severity.ERROR,
        "orphan index entry whose lower alias is still visible",
        "Move the entry to the quarantine", False,
        "At mount `orphan index entry (index/%s, ftype=8000, nlink=1)`: removed, so the visible "
        "file loses its copied-up content, or with nfs_export whited out, after which its "
        "lookup fails with EIO `bad index found (…)` (H7b, H18b, measured).",
        "The entry has no upper alias (its only link is the index), its lower object is "
        "still visible in the merged view, and the kernel's nlink computation says orphan "
        "(the lower object has one link, so the `nlink` xattr is not consulted). This happens "
        "when an upper alias is deleted offline. The entry holds the only copy of the "
        "copied-up data. The fix moves it to the quarantine (kept, never deleted): the file "
        "then shows its lower content, as the kernel would show it without nfs_export; the "
        "copied-up version can be restored from the quarantine or with `ovlfsck undo`.",
    ),
    _P(
        "OVL606", "index-unreachable", Severity.IGNORE,
        "index entry whose data cannot be reached from the merged view",
        "Move the entry to the quarantine", False,
        "Depends on the nlink computation: the entry is removed at mount (`orphan index entry "
        "(…)`, or whited out with nfs_export) or kept for ever and never shown. The kernel "
        "itself leaves such entries: an indexed file unlinked after a remount with nfs_export "
        "(the overlay link count then counts the index link), or one whose lower hardlinks "
        "are hidden or outside the layer (measured).",
        "No upper alias and no visible lower alias: the copied-up data in the entry belongs to "
        "a file that is no longer in the merged view, normally because it was deleted through "
        "the overlay. Since the kernel makes this state itself it is not reported by default; "
        "`--severity index-unreachable=warning` lists such entries, and with `=error` the fix "
        "moves them to the quarantine, so the data is kept where the kernel would delete it.",
    ),
    _P(
        "OVL607", "index-stale", Severity.ERROR,
        "index entry whose lower object is gone",
        "Move the entry to the quarantine", True,
        "Removed at mount: `failed to verify index (index/%s, ftype=%x, err=-116)`, after "
        "`invalid origin (…)` when the handle decodes to an object of another type (H2b, "
        "measured).",
        "A file entry with no other link whose name (its origin) no longer decodes to a lower "
        "object (the lower layer was changed offline, or the filesystem uuid changed) or "
        "decodes to an object of another file type. Nothing in the merged view reaches it; "
        "the kernel deletes it at the next mount. The fix moves it to the quarantine.",
    ),
    _P(
        "OVL608", "index-stale-unused", Severity.INFO,
        "index entry for a lower object that is gone (kept and never used by the kernel)",
        None, False,
        "Kept at mount (whiteouts, directories and entries with an upper alias are not "
        "checked against the lower layer); never found by a lookup.",
        "The lower object the name encodes no longer exists. The entry is harmless; an upper "
        "alias still holds the data. Reported for information.",
    ),
    _P(
        "OVL609", "index-dir-no-upper", Severity.ERROR,
        "directory index entry without a usable upper xattr",
        "Move the entry to the quarantine", True,
        "nfs_export: removed at mount: `failed to verify index (index/%s, ftype=4000, "
        "err=-116)`, after `invalid origin (…)` for a malformed value (H18a, measured).",
        "With nfs_export every copied-up directory has an index entry (an empty mode-0 "
        "directory) whose `upper` xattr is the file handle of the upper directory. Missing, "
        "malformed, of an unknown version or of another filesystem, the kernel deletes the "
        "entry. It holds no data; the fix moves it to the quarantine.",
    ),
    _P(
        "OVL610", "index-dir-upper-not-dir", Severity.ERROR,
        "directory index entry whose upper xattr names something that is not a directory",
        "Move the entry to the quarantine", True,
        "nfs_export: mount fails (EIO): `invalid index upper (index/%s, upper=%s).`, `failed "
        "to verify index (…, ftype=4000, err=-5)`, `failed index dir cleanup (-5)`, `try "
        "deleting index dir or mounting with '-o index=off' to disable inodes index.` (H18d)",
        "The entry holds no data; the fix moves it to the quarantine.",
    ),
    _P(
        "OVL611", "index-dir-orphan", Severity.ERROR,
        "directory index entry whose upper directory is gone",
        "Move the entry to the quarantine", True,
        "nfs_export: at mount `orphan index entry (index/%s, ftype=4000, nlink=2)` and the "
        "entry is turned into a whiteout; if the lower directory is still visible every "
        "lookup of it then fails with EIO `bad index found (…)` (H18b).",
        "The upper directory was deleted or replaced offline. The entry holds no data; the fix "
        "moves it to the quarantine, so a still-visible lower directory stays accessible.",
    ),
    _P(
        "OVL612", "index-whiteout-reachable", Severity.ERROR,
        "whiteout index entry for an object that is still visible",
        "Restore the upper whiteout, or move the index whiteout to the quarantine", True,
        "Every lookup of the object fails with EIO: `bad index found (index=index/%s, "
        "ftype=2000, origin ftype=%x).` (H18b, H19f)",
        "A whiteout in work/index records that every alias of a lower object was deleted "
        "(nfs_export). When the object is visible again (the upper whiteout covering it was "
        "removed offline), its lookups fail. The fix honours the recorded deletion: it "
        "creates the whiteout again in the upper directory of each visible lower alias. When "
        "that is not possible (the object is reached through an upper file or an upper "
        "directory, or the alias's directory has no upper directory) it moves the index "
        "whiteout to the quarantine instead, so the object is shown.",
    ),
    _P(
        "OVL613", "index-type-mismatch", Severity.ERROR,
        "index entry of another file type than the lower object it names",
        None, False,
        "A lookup of the lower object fails with EIO `bad index found (index=…, ftype=%x, "
        "origin ftype=%x).`; an upper alias logs `invalid origin (…)` (measured).",
        "Index entries are never made of another type than their lower object (a whiteout "
        "aside). Which of the two is wrong cannot be told from the layers, so nothing is "
        "fixed automatically; move the entry away by hand once its content is saved.",
    ),
    _P(
        "OVL614", "nlink-bad-format", Severity.ERROR,
        "nlink xattr the kernel cannot parse",
        "Set nlink to the counted value", True,
        "`failed to get index nlink (%pd2, err=%i)` at lookup, and the file's link count falls "
        "back to the real one (H9); an entry without an upper alias is then an orphan at mount.",
        "The `nlink` xattr of an indexed file (on its index entry and upper aliases, one inode) "
        "must be `U` or `L`, a sign and a decimal number, at most 12 bytes; it is read when "
        "the lower object has more than one link. The fix writes `U%+d` so that the overlay "
        "link count equals the upper aliases plus the lower aliases visible in the merged view.",
    ),
    _P(
        "OVL615", "nlink-too-low", Severity.ERROR,
        "nlink xattr counts fewer links than the merged view has",
        "Set nlink to the counted value", True,
        "The overlay link count is too low; unlinking the aliases drops it to 0 while some "
        "remain, and the kernel then removes (or with nfs_export whites out) the index entry: "
        "the remaining lower aliases revert to their lower content or fail with EIO; a value "
        "<= 0 gives `failed to get index nlink (…, err=0)` and makes an entry without upper "
        "alias an orphan at mount (H7, H7b).",
        "`U%+d` is relative to the upper inode's link count, `L%+d` to the lower object's. "
        "The computed count must be at least the upper aliases plus the lower aliases visible "
        "in the merged view (it may be higher: the kernel starts from the lower link count, "
        "which also counts hardlinks hidden or outside the layer, so a higher value is never "
        "reported). A typical cause is an upper alias deleted offline (H7): its lower alias is "
        "visible again and shows the copied-up data. The fix writes the counted value.",
    ),
    _P(
        "OVL620", "index-moved", Severity.ERROR,
        "index entry named after a handle of the layers' old location (copied layers)",
        "Rename the index entry to the new handle", False,
        "The name no longer decodes (another uuid) or decodes to the original object of a "
        "copy: the kernel never finds the entry again. A file entry is kept unused; at mount "
        "a directory entry whose `upper` is another filesystem's, and an entry with no other "
        "link, are removed (`failed to verify index (..., err=-116)`). The hardlink aliases "
        "tied by a file entry come apart, and an NFS handle of a directory or of a deleted "
        "hardlink no longer finds its entry.",
        "The layers were copied. The entry is renamed in place to the hex of the handle of the "
        "object it must now stand for, so a file entry stays the same inode as its upper "
        "aliases (the hardlink is kept): the new handle its upper alias's origin gets "
        "(OVL520/OVL507), or the one the record made by `ovlfsck record` names (the only "
        "source for whiteout entries of deleted hardlinks). The entry's `origin` (file "
        "entries) or `upper` (directory entries) xattr is rewritten with it. -p applies only "
        "exact renames (from the record or a directory's merged lower directory). Entries "
        "whose object cannot be told are left to OVL607/OVL608/OVL609.",
    ),
)
