"""Catalog rows for the workdir: work/work leftovers, temporaries, incompat/volatile (codes OVL7xx). See problems.py for the row fields.

What the 6.18 kernel does with the workdir (overlay-format.md §10, measured again for these
rows on 6.18.44/ext4):

* at every read-write mount `work/work` is removed and recreated empty. Its entries (level
  1) are unlinked, or removed after their own entries (level 2); a level-2 entry is only
  unlinked or rmdir'ed, so a non-empty directory at level 2 (`work/work/a/b/c`) makes the
  cleanup fail and the mount silently goes read-only;
* a non-directory `work/work` is unlinked and replaced;
* `work/work/incompat` containing any name that does not start with `.` fails every mount;
* `work/index` is persistent; with index=on its `#` entries are removed with the same two
  level limit, but there a failure only logs and the mount stays read-write;
* entries of the workdir root other than `work` and `index` are never looked at (ovlfsck's
  own `ovlfsck/` state directory lives there).
"""
from __future__ import annotations

from ovlfsck.problems import Problem, Severity

_P = Problem

ROWS: tuple[Problem, ...] = (
    _P(
        "OVL701", "work-uncleanable-leftover", Severity.ERROR,
        "leftover in work/work that the kernel cannot clean: the next mount is read-only",
        "Move the leftover to the quarantine", True,
        "At every read-write mount the kernel empties `work/work`, but only two levels deep "
        "(`ovl_workdir_cleanup`): a non-empty directory two levels down cannot be removed. "
        "The mount then succeeds READ-ONLY without failing: `cleanup of 'a/b' failed (-39)`, "
        "`cleanup of 'work/a' failed (-39)`, `failed to create directory .../work (errno: 17); "
        "mounting read-only` (6.18: `work/work/a/b/c` makes the mount read-only, "
        "`work/work/a/b` does not). Before failing, the cleanup deletes the sibling entries it "
        "reaches first; with index=on the read-only mount also drops the index.",
        "Copy-up and rename temporaries (`#<hex>`) are made in `work/work` (in `work/index` "
        "with index=on) and renamed into the upper layer when complete; a crash leaves them "
        "behind. The kernel itself never builds trees this deep, so they come from older "
        "kernels, interrupted tools or files put there by hand. The fix moves the whole "
        "first-level entry to the quarantine, where it stays: a copy-up cut short by a crash "
        "may hold the only copy of data written just before it, so look at it before deleting "
        "the quarantine. Shallow leftovers are `work-leftover` (the kernel removes them).",
    ),
    _P(
        "OVL702", "work-leftover", Severity.INFO,
        "leftover in work/work, removed by the kernel at the next read-write mount",
        None, False,
        "Removed without a message at the next read-write mount (entries of `work/work` and "
        "their direct children are unlinked or removed); the mount is not affected.",
        "A temporary (`#<hex>`) or other object left in `work/work`, usually by a crash during "
        "a copy-up or rename. Nothing needs fixing; it is reported so that anything worth "
        "keeping can be copied out before the next mount deletes it. The kernel's spare "
        "whiteout (`work/work/#<hex>`, a 0/0 character device that survives every unmount "
        "without index) is normal and never reported.",
    ),
    _P(
        "OVL703", "work-not-directory", Severity.INFO,
        "the kernel's work/work is not a directory; replaced at the next read-write mount",
        None, False,
        "A non-directory `work/work` (file, symlink, device...) is unlinked and replaced by an "
        "empty directory at the next read-write mount, without a message (6.18).",
        "The kernel only ever creates `work/work` as a directory (mode 0). Whatever is there "
        "instead is deleted by the next mount; copy it out first if it is worth keeping.",
    ),
    _P(
        "OVL704", "work-incompat-feature", Severity.ERROR,
        "an incompatible feature in work/work/incompat makes every mount fail",
        "Move work/work/incompat to the quarantine (the upper layer may be inconsistent)", False,
        "Every mount fails with EINVAL: `overlay with incompat feature '%s' cannot be mounted` "
        "(6.18: for `volatile` and any other name not starting with `.`; mounts with `ro`, "
        "`index=on` or `volatile` again fail the same way; an empty `work/work/incompat` is "
        "simply removed). A `volatile` mount creates `work/work/incompat/volatile/dirty` and "
        "unmount does not remove it.",
        "A `volatile` mount never syncs the upper filesystem, so a crash or power loss while it "
        "was mounted can leave the upper layer inconsistent (files missing, empty, or older "
        "than what was written), and nothing records whether that happened. The kernel "
        "documentation calls the marker \"a strong indicator that user should throw away upper "
        "and work directories and create fresh one\"; only if you are certain the system did "
        "not crash since the volatile mount may the marker be removed. The fix moves "
        "`work/work/incompat` to the quarantine (so undo can put it back) and is never applied "
        "by `-p`: it needs an explicit yes (`-y` or interactively). A name other than "
        "`volatile` is a feature this checker does not know (written by another kernel); "
        "removing it lets this kernel mount layers that may depend on it.",
    ),
    _P(
        "OVL705", "index-not-directory", Severity.ERROR,
        "the kernel's work/index is not a directory: every mount with index=on fails",
        "Move it to the quarantine", True,
        "With index=on the mount fails with ENOTDIR (`Not a directory`) and no overlayfs "
        "message (6.18; a symlink is not followed either). Mounts without the index ignore it.",
        "The kernel only creates `work/index` as a directory (mode 0). The fix moves the "
        "object to the quarantine; the next mount with index=on creates a fresh, empty index "
        "directory (index entries that were lost with the old directory cannot be recovered "
        "from here).",
    ),
    _P(
        "OVL706", "index-temp-leftover", Severity.INFO,
        "temporary in work/index, removed by the kernel at the next mount with index=on",
        None, False,
        "Removed without a message by the index cleanup of the next read-write mount with "
        "index=on (`ovl_indexdir_cleanup`, entries starting with `#` and their direct "
        "children); mounts without the index leave it alone.",
        "With index=on, `work/index` is also the kernel's work directory: copy-up, rename and "
        "directory-index temporaries (`#<hex>`) are made there and a crash leaves them behind. "
        "Nothing needs fixing. The spare shared whiteout (`work/index/#<hex>`, a 0/0 character "
        "device) survives every unmount and is normal: it is never reported.",
    ),
    _P(
        "OVL707", "index-uncleanable-temp", Severity.ERROR,
        "temporary in work/index that the kernel cannot clean",
        "Move the leftover to the quarantine", True,
        "The index cleanup of every mount with index=on fails on it and logs "
        "`cleanup of '#N/x' failed (-39)` and `cleanup of 'index/#N' failed (-39)`; the mount "
        "stays read-write (6.18). The name stays taken: by the source (`ovl_lookup_temp`), a "
        "later temporary of the same name fails with `workdir/#N already exists` (EIO).",
        "Like `work/work`, `#` entries of the index are cleaned only two levels deep: a "
        "non-empty directory two levels down stays forever. The fix moves the whole entry to "
        "the quarantine, where it stays (it may hold the only copy of data a crash cut short).",
    ),
)
