"""Catalog rows for metacopy, data-only layers, verity digests, protattr (codes OVL8xx). See problems.py for the row fields.

What the 6.18 kernel does (overlay-format.md §3.1, §6, §7, §8.3; measured again for these
rows on 6.18.44/ext4, see passes/metacopy.py for the lookup model):

* the metacopy xattr is read with a zero-size buffer on every lookup: sizes 1-3 fail the
  lookup (EIO); anything else, garbage included, is accepted there. The struct is parsed
  only on the fs-verity paths (verity=on|require), where a bad version, a length field that
  is not the size, a value over 68 bytes or a digest that does not fit its algorithm fail
  the open (EIO);
* the data of a metacopy file is looked up by its path or its redirect, never by its origin;
  the chain goes down through metacopy files to the first regular file without the xattr;
  a data-only layer is reached only through an absolute redirect on a metacopy file of a
  regular *lower* layer, lazily at open;
* protattr is read on upper inodes only; any non-empty run of the letters `a` and `i` of at
  most 32 bytes is honoured (`ia` and `aa` too), anything else is ignored.
"""
from __future__ import annotations

from ovlfsck.problems import Problem, Severity

_P = Problem

_REDIRECT_FIX = (
    "The fix is offered only when it is certain: the file's `origin` handle encodes the lower "
    "file found at the metacopy file's own path (in the layers beneath, without the "
    "redirect). Then the redirect is wrong and removing it makes the lookup find exactly the "
    "file that was copied up. Otherwise nothing is changed: which lower file holds the data "
    "cannot be known, and an upper metacopy file holds no data of its own (it is sparse), so "
    "no repair can restore its content. Restore the lower file, or remove the metacopy "
    "file by hand if its content is lost."
)

ROWS: tuple[Problem, ...] = (
    _P(
        "OVL801", "metacopy-xattr-too-small", Severity.ERROR,
        "metacopy xattr of 1 to 3 bytes",
        "Replace with an empty metacopy value", True,
        "Every lookup of the file fails with EIO: `metacopy file '%pd' has too small xattr` "
        "(6.18, sizes 1, 2 and 3).",
        "The kernel writes the metacopy xattr empty (no fs-verity digest) or as a `struct "
        "ovl_metacopy` of 4 to 68 bytes; 1 to 3 bytes cannot even hold its header, so they "
        "carry no digest. When the upper file holds no data of its own (it is sparse, as every "
        "metacopy copy-up is) or holds exactly the data of the lower file the lookup finds, "
        "the fix writes the empty value, which makes the file the metacopy file it was meant "
        "to be. When the file holds other data, nothing is changed: whether that data or the "
        "lower file is the content cannot be known (remove the xattr by hand to keep the "
        "upper data).",
    ),
    _P(
        "OVL802", "metacopy-xattr-malformed", Severity.ERROR,
        "metacopy xattr that is not a valid struct ovl_metacopy",
        "Replace with an empty metacopy value", True,
        "Lookups accept it; with verity=on or verity=require opening the file fails with EIO: "
        "`metacopy file '%pd' has unsupported version`, `... has invalid xattr size`, "
        "`failed to get metacopy (-34)` (over 68 bytes) or `lower file '%pd' has the wrong "
        "fs-verity digest` (a digest that does not fit its algorithm). With verity=off the "
        "value is ignored (6.18: a 5-byte garbage value, version 1 and a 69-byte value all "
        "read the lower data).",
        "A valid value is: version 0, a length field equal to the xattr size, and a digest of "
        "32 bytes for algorithm 1 (SHA-256) or 64 bytes for algorithm 2 (SHA-512), or no "
        "digest and algorithm 0. The kernel never writes anything else, so a malformed value "
        "was damaged or made by a broken tool, and its digest cannot be used. The fix writes "
        "the empty value the kernel itself writes when there is no digest; the file then "
        "works with verity=off and verity=on. With verity=require a file without a digest "
        "still fails (`has no digest specified`), so there the fix is not applied by -p.",
    ),
    _P(
        "OVL803", "metacopy-on-non-regular", Severity.ERROR,
        "metacopy xattr on something that is not a regular file",
        "Remove the metacopy xattr", True,
        "Ignored: only regular files can be metacopy files (6.18: a directory and a symlink "
        "with the xattr behave as without it).",
        "The kernel makes metadata-only copies of regular files only. The stray xattr is "
        "removed; nothing visible changes.",
    ),
    _P(
        "OVL804", "metacopy-no-lower-data", Severity.ERROR,
        "metacopy file whose data is in no layer beneath",
        "Remove the redirect (the origin proves the data is at the file's own path)", True,
        "Every lookup fails with EIO: `metacopy with no lower data found - abort lookup "
        "(%pd2)` (6.18: lower data deleted, relative or absolute redirect to a missing name or "
        "to a directory, a metacopy file in an opaque upper directory or in the lowermost "
        "layer, an upper metacopy file whose absolute redirect names a file of a data-only "
        "layer only, or an absolute redirect into the data-only layers that a directory on "
        "the way in a lower layer beneath disarms).",
        "A metacopy file holds metadata only; its data is the first regular file without the "
        "metacopy xattr that the kernel finds beneath it by the file's path, or by its "
        "redirect (relative: another name in the same directory; absolute: a path from the "
        "root of every lower layer), going down through other metacopy files. A data-only "
        "layer is reached only through an absolute redirect on a metacopy file of a regular "
        "lower layer. The detail names where the lookup ended. " + _REDIRECT_FIX,
    ),
    _P(
        "OVL805", "metacopy-redirect-invalid", Severity.ERROR,
        "metacopy file with a malformed or escaping redirect",
        "Remove the redirect (the origin proves the data is at the file's own path)", True,
        "A malformed value fails every lookup with EINVAL: `invalid redirect (%s)`; a `.` or "
        "`..` component fails it with EACCES when the walk reaches it, without a message "
        "(6.18). NUL bytes and values longer than redirect_max are refused too.",
        "A redirect is either a bare name (no `/`) or an absolute path without empty, `.` or "
        "`..` components; ovlfsck never follows anything else (the path could leave the "
        "layer). The kernel writes redirects on metacopy files when they are renamed (a bare "
        "name within a directory, an absolute path across directories) or linked (absolute). "
        + _REDIRECT_FIX,
    ),
    _P(
        "OVL806", "metacopy-data-only-missing", Severity.ERROR,
        "metacopy file whose data is in no data-only layer",
        None, False,
        "Lookup and stat succeed (size and owner come from the metacopy file), but opening "
        "the file fails with ENOENT: `lazy lowerdata lookup failed (%pd2, err=-2)`; err=-40 "
        "(ELOOP) when the path goes through a symlink (6.18).",
        "The data of a metacopy file with an absolute redirect into the data-only layers is "
        "looked up at first open, in each data-only layer in order, with the redirect as a "
        "path beneath the layer root that may not follow symlinks or cross a mount, and it "
        "must end at a regular file. None of the data-only layers has it, so the content is "
        "lost unless the data-only layer that had it is added again. Nothing is changed.",
    ),
    _P(
        "OVL807", "metacopy-origin-mismatch", Severity.ERROR,
        "metacopy file whose origin is not the lower file its path or redirect leads to",
        "Remove the redirect (the origin proves the data is at the file's own path)", True,
        "With index=on every lookup fails with ESTALE: `failed to verify origin (%pd2, "
        "ino=%lu, err=-116)`, naming the lower file found (6.18, H29). With index=off the "
        "mismatch is not detected and the file shows the other file's data (H29b).",
        "A metacopy copy-up stores the lower file it copied as `origin`. When the origin "
        "still exists but the path or redirect leads to another lower file (lower files "
        "renamed or swapped offline, or a redirect changed), the data shown would not be the "
        "file's, which the kernel refuses when the index is on and shows without a word when "
        "it is off. Only origins that still decode to a regular file are compared, as the "
        "kernel does (a stale origin means 'origin unknown'); malformed, stale or wrongly "
        "typed origins are `origin-*` problems. " + _REDIRECT_FIX,
    ),
    _P(
        "OVL808", "metacopy-not-followed", Severity.ERROR,
        "metacopy files that the mount options make the kernel refuse to follow",
        None, False,
        "Lookups fail with EPERM: `refusing to follow metacopy origin for (%pd2)` (6.18, with "
        "metacopy=off and the default options). userxattr cannot be combined with "
        "metacopy=on at all: `conflicting options: userxattr,metacopy=on`.",
        "Metacopy files are followed only with metacopy=on, except a metacopy file whose "
        "absolute redirect leads into a data-only layer when no regular lower layer lies "
        "beneath it (composefs-style images). Reported once for the stack, with the number "
        "of files and the first one. Mount with metacopy=on (not possible with userxattr: "
        "then the layers need a full copy of each file's data, which ovlfsck does not make).",
    ),
    _P(
        "OVL809", "metacopy-option-missing", Severity.WARNING,
        "metacopy files, but the stack is checked without metacopy=on",
        None, False,
        "With the default options of this kernel (module parameter metacopy=N) lookups fail "
        "with EPERM: `refusing to follow metacopy origin for (%pd2)`.",
        "The layers hold metacopy files that only a metacopy=on mount follows. Give the mount "
        "options to ovlfsck (`-o ...,metacopy=on`) so that it checks what the mount will do; "
        "with metacopy=off given explicitly this is `metacopy-not-followed`.",
    ),
    _P(
        "OVL810", "metacopy-data-size-mismatch", Severity.WARNING,
        "metacopy file whose size differs from its data's",
        None, False,
        "No message: stat shows the metacopy file's size while reads return the data file's "
        "content up to its own end (6.18: size 11 with 3 or 31 bytes of data read).",
        "A metacopy copy-up gives the upper file the lower file's size, and every change of "
        "the size copies the data up first; a difference means the lower file was changed "
        "after the copy-up, which overlayfs does not allow with metacopy. Which size is right "
        "cannot be known; nothing is changed.",
    ),
    _P(
        "OVL811", "metacopy-digest-required", Severity.ERROR,
        "metacopy files without an fs-verity digest while verity=require is given",
        None, False,
        "Opening the file fails with EIO: `metacopy file '%pd' has no digest specified` (H11d).",
        "verity=require accepts only metacopy files whose xattr holds the fs-verity digest of "
        "the data. The digest can only be taken from the data file with fs-verity enabled; "
        "ovlfsck does not compute it. Reported once for the stack.",
    ),
    _P(
        "OVL851", "protattr-invalid", Severity.ERROR,
        "protattr xattr with a value the kernel ignores",
        "Remove the protattr xattr", True,
        "Ignored with `incompatible overlay.protattr format (%pd2, len=%d)` for an empty value "
        "or other letters; silently for a value over 32 bytes (6.18). The file is then "
        "neither append-only nor immutable.",
        "The kernel keeps the append-only and immutable flags of upper files in `protattr`: "
        "`a`, `i` or `ai` (it accepts any non-empty run of `a` and `i` of at most 32 bytes). "
        "Removing an unusable value keeps exactly what the kernel does today; if the file "
        "was meant to be protected, `chattr +a`/`+i` it through the mount. Only upper files "
        "are checked: the kernel never reads protattr in lower layers.",
    ),
)
