"""Catalog rows for origin file handles, the upper-root origin, the index dir's upper, the uuid xattr (codes OVL5xx). See problems.py for the row fields."""
from __future__ import annotations

from ovlfsck.problems import Problem, Severity  # noqa: F401

_P = Problem
ROWS: tuple[Problem, ...] = (
    _P(
        "OVL501", "origin-malformed", Severity.ERROR,
        "origin xattr that is not a valid file handle",
        "Repair the origin xattr", True,
        "`invalid origin (%*phN)` at every lookup of a non-directory, and the value is ignored "
        "(H3c). On a directory the value is only read with nfs_export: `invalid origin`, then "
        "`failed to verify origin` and the directory is not merged; with a directory index "
        "entry the mount itself fails (`failed to verify index (..., err=-61)`). The kernel "
        "never replaces an existing value.",
        "The `origin` xattr must be an overlay file handle (§4: version 0, magic 0xfb, a length "
        "field that fits the value, at least 21 bytes) or empty (copied up, origin unknown). On "
        "a directory that merges with a lower directory the fix writes the handle of that lower "
        "directory, exactly what the kernel writes at copy-up; elsewhere it removes the xattr "
        "(nothing visible changes: the kernel ignores the value; for a merged directory it "
        "would re-add a correct one at the next lookup, H27).",
    ),
    _P(
        "OVL502", "origin-unknown-format", Severity.ERROR,
        "origin handle of an unknown version, flags or byte order",
        "Repair the origin xattr", True,
        "Silently treated as \"origin unknown\" (ENODATA): st_ino falls back to the upper inode "
        "(H3e). With nfs_export a directory carrying it is not merged (`failed to verify "
        "origin`).",
        "A version above 0, flag bits outside 0x07, or a handle written on a machine of the "
        "other byte order without the any-endian flag. The kernel can never use it. The fix is "
        "the same as for a malformed value: the lower directory's handle on a merged "
        "directory, removal elsewhere.",
    ),
    _P(
        "OVL503", "origin-wrong-type", Severity.ERROR,
        "origin handle decodes to an object of another file type",
        "Remove the origin xattr", True,
        "`invalid origin (%pd2, ftype=%x, origin ftype=%x).` at every lookup, and the origin is "
        "ignored (H3b).",
        "The handle decodes (open_by_handle_at on the lower layer whose uuid it carries) to, for "
        "example, a directory while the entry is a regular file: a stale inode number reused by "
        "another object, or a value copied from another entry. The fix removes it; nothing "
        "visible changes except that the warning stops. (A directory whose merged lower "
        "directory disagrees is OVL507/OVL508, whose fix re-encodes it.)",
    ),
    _P(
        "OVL504", "origin-stale", Severity.WARNING,
        "origin handle that resolves to no lower object",
        "Remove the origin xattr", False,
        "Silently treated as \"origin unknown\" (H3a, H3g): st_ino is the upper inode's, so it "
        "changed when the handle went stale; nothing is logged.",
        "The handle carries the uuid of no lower layer's filesystem (the layers were copied to "
        "another filesystem, or the lower was replaced), or the object it names no longer "
        "exists (ESTALE: deleted, or the layer was re-created). The kernel behaves as if there "
        "were no origin, so this is a warning. Removing it changes nothing visible, but it "
        "throws away the only record of where the file was copied up from (what a rehandling "
        "after a layer copy needs), so -p never does it. Indexed hardlinks are OVL505.",
    ),
    _P(
        "OVL505", "origin-stale-indexed", Severity.ERROR,
        "indexed hardlink whose origin handle names no object of the lower layers",
        "Make it a plain upper file", False,
        "With the index in use, the upper aliases of the hardlink are no longer tied to their "
        "index entry: their st_ino and nlink differ from those of lower aliases that are not "
        "copied up, which now show the old lower content: the hardlinks come apart. Nothing is "
        "logged.",
        "The file was copied up through the index (it has an `nlink` xattr) but its origin "
        "names no object of the lower layers any more: another filesystem's uuid, an object "
        "that is gone, or one outside the layers (the layers were copied, or the lower was "
        "replaced), and neither the record of `ovlfsck record`, nor the paths of its aliases, "
        "nor elimination among the lower hardlinks (see OVL520) tell which lower object it "
        "must now name (OVL520 is the rewrite when they do). "
        "Nothing is guessed. When the `nlink` xattr shows that every alias is in the upper "
        "layer (no lower alias shows the data), -y makes it a plain upper file: origin and "
        "nlink are removed and its index link goes to the quarantine; the data stays in the "
        "upper file and only st_ino changes. Otherwise it is reported only: find the record, "
        "or mount with index=off knowing that the hardlinks are separate files.",
    ),
    _P(
        "OVL506", "origin-outside-layers", Severity.WARNING,
        "origin handle names an object outside the lower layers",
        "Remove the origin xattr", False,
        "No message: the kernel decodes the handle and uses that object as the origin; st_ino "
        "is the inode number of a file the overlay does not show (with index=on it is also the "
        "key of the index lookup).",
        "Typical after the layers were copied within one filesystem (`cp -a`, `tar`) while the "
        "originals still exist: every handle still decodes to the original objects, not to "
        "the copies. Removing it changes this file's st_ino (and its hardlink identity under "
        "the index) to the upper inode's and loses the record of the old origin, so -p never "
        "does it; for directories that merge, see OVL507/OVL508 (re-encoded from the merged "
        "lower directory).",
    ),
    _P(
        "OVL507", "dir-origin-unverified", Severity.ERROR,
        "merged directory whose origin does not verify against its lower directory (nfs_export)",
        "Re-encode the origin from the lower directory", True,
        "With nfs_export the lower directory is NOT merged: `failed to verify origin (%pd2, "
        "ino=%lu, err=-116)` and its content disappears from the overlay without an error "
        "(G3); the mount-time index cleanup also removes the directory's index entry "
        "(`failed to verify index (..., err=-116)`).",
        "The stored handle differs from the handle of the lower directory the name (or the "
        "redirect) leads to: the layers were copied, or the origin was copied from another "
        "directory. nfs_export is in use (the hint, or directory entries in work/index). The "
        "fix writes the lower directory's handle, as the kernel does at copy-up. When the "
        "stored handle names another directory of the layers (a rename whose redirect was "
        "lost?) -p leaves it.",
    ),
    _P(
        "OVL508", "dir-origin-mismatch", Severity.WARNING,
        "merged directory whose origin does not match its lower directory",
        "Re-encode the origin from the lower directory", True,
        "Without nfs_export the kernel never reads a directory's origin once set: nothing "
        "happens. Mounting with nfs_export=on would hide the lower directory's content "
        "(OVL507).",
        "As OVL507, but nfs_export is not in use, so this is a warning. The fix writes the lower "
        "directory's handle.",
    ),
    _P(
        "OVL509", "upper-root-origin-mismatch", Severity.ERROR,
        "upper root origin is not the handle of the top lower layer's root (index in use)",
        "Re-encode the upper root origin", True,
        "Mount fails ESTALE: `failed to verify upper root origin` (G1, G4, H13). Only with "
        "index=on (or an existing index); a missing value is simply set.",
        "With the index, the upper root's `origin` ties the upper to its lower: it must be the "
        "handle of the top lower layer's root. It differs after the layers were copied (other "
        "uuid, other inode numbers) or when the upper is put on another lower. The fix writes "
        "the current lower root's handle; -p does it only when every other origin of the "
        "layers verifies against the current lowers (the mismatch is then isolated). After a "
        "copy of the layers the index entries are stale as well: the mount then works, but "
        "indexed hardlinks need rehandling.",
    ),
    _P(
        "OVL510", "lower-origin-mismatch", Severity.WARNING,
        "origin in a lower layer that does not match the layers beneath it",
        "Repair the origin xattr", False,
        "Never read: the kernel uses origins of the upper layer only. It matters once the layer "
        "is used as an upper again.",
        "A former upper used as a lower layer keeps the origins of its copy-ups. Checked against "
        "the layers beneath it (as for the upper, the lowermost layer excepted): malformed, "
        "unknown format, wrong type, stale, or a directory whose origin is not its merged lower "
        "directory. The fix writes the merged lower directory's handle on a directory and "
        "removes it elsewhere (lower layers are repaired only with --repair-lowers); -p only "
        "repairs invalid values.",
    ),
    _P(
        "OVL511", "index-dir-upper-mismatch", Severity.ERROR,
        "work/index's upper xattr is not the handle of the upper root",
        "Re-encode the index dir's upper xattr", True,
        "A valid but different value fails the mount: `failed to verify upper (...)`, `failed "
        "to verify index dir 'upper' xattr`, `try deleting index dir or mounting with '-o "
        "index=off' to disable inodes index.` (H14b). An invalid value logs `invalid origin` "
        "and is rewritten (H14a); a missing one is set (H14c).",
        "The index directory records which upper directory it belongs to (a handle with the "
        "path-upper flag 0x04). It differs after the layers were copied, or when a workdir is "
        "reused with another upper. The fix writes the upper root's handle; -p does it only "
        "when every origin of the layers verifies (the mismatch is isolated). If the index "
        "belongs to another upper directory, move work/index aside instead.",
    ),
    _P(
        "OVL512", "uuid-xattr-bad-size", Severity.ERROR,
        "upper root uuid xattr is not 16 bytes",
        "Remove the uuid xattr", True,
        "`failed to get uuid (%pd2, err=%i); falling back to uuid=null.` at every mount with "
        "uuid=on or uuid=auto (H28).",
        "The overlay's own uuid (`uuid` on the upper root) is 16 raw bytes. A value of any "
        "other size cannot be used. The fix removes it: with uuid=auto an upper root marked "
        "impure then behaves as uuid=null, as it does now, and otherwise (and with uuid=on) the "
        "kernel generates and stores a new uuid at the next mount.",
    ),
    _P(
        "OVL513", "handles-null-uuid", Severity.INFO,
        "file handles carry a null uuid: the layers were used with uuid=off",
        None, False,
        "With uuid=off the kernel writes a null uuid into every handle and accepts only null "
        "ones; mounted without it the kernel ignores those origins, and with index=on refuses "
        "to mount (`failed to verify upper root origin`, G4c).",
        "Origins whose handle verifies against the layers except for a null uuid, while the "
        "filesystem has a uuid. Reported for information, with the mount option to use; "
        "ovlfsck then accepts null-uuid handles (give `-o uuid=off` to say so, or another "
        "uuid= value to have them checked strictly).",
    ),
    _P(
        "OVL514", "origin-shared", Severity.ERROR,
        "file shares its origin with another file the overlay shows (one of them fails ESTALE)",
        "Remove the origin xattr", True,
        "Both files map to one overlay inode (hashed by the origin's inode): whichever is "
        "looked up second fails with ESTALE (`Stale file handle`) and `failed to get inode "
        "(-116)`, so one of them is inaccessible, which one depending on lookup order. Only "
        "for an origin with one link: a lower file with several links is not used to identify "
        "an upper file that is not indexed.",
        "Two different upper files (not hard links) carry the same origin, or an upper file's "
        "origin names a lower file that is still visible at its own path. The file at the "
        "origin's own path keeps it; the other loses it (its st_ino becomes its upper inode's, "
        "and it is a separate inode again). "
        "When the paths do not tell which is right, -p leaves it and -y keeps the first in path "
        "order. Typical after `cp -a` of copied-up files inside the upper layer.",
    ),
    _P(
        "OVL520", "origin-moved", Severity.ERROR,
        "origin handle of the layers' old location (copied layers): rewritten for the new one",
        "Rewrite the origin for the new location", False,
        "The handle carries the old filesystem's uuid (or, after a copy within one filesystem, "
        "names the original object, not the copy): the kernel ignores it silently, so st_ino "
        "changes; for an indexed hardlink the aliases come apart (a lower alias that is not "
        "copied up shows the old lower content) and its index entry is never found again.",
        "The layers were copied (tar, rsync, cp -a, a restored backup, a cloned disk). The new "
        "target is the object the handle must now name: the one the record made by `ovlfsck "
        "record` at the original location names (exact; -p applies it), else the lower file "
        "of the same type at the entry's own path (for an indexed hardlink: the single lower "
        "file found at the paths of all its aliases; when no path leads to it, because the "
        "aliases were renamed after the copy-up, the one lower inode that elimination "
        "leaves: at least two links, named by no other handle, one name shown and one "
        "hidden in the merged view, as many names shown as the `nlink` xattr leaves for "
        "lower aliases, the same data as the upper file, and fitting no other such file; -y "
        "applies these, -p leaves them). The fix "
        "writes that object's handle, as the kernel would at copy-up; the index entry named "
        "after the old handle is renamed to match (OVL620). A target that cannot be told with "
        "certainty is never guessed: the entry is reported as OVL504/OVL505/OVL506 and kept.",
    ),
)
