"""The problem catalog: one row per problem kind (e2fsck's problem table, git fsck's ids).

Codes and names are forever. `explain`, `problems` and docs/problems.md are generated from
these rows; a test keeps docs/problems.md current.
"""
from __future__ import annotations

import enum
from dataclasses import dataclass
from typing import Optional


class Severity(enum.Enum):
    """error: counted in the exit code and fixed by -y/-p; warning/info: reported only;
    ignore: not reported (a default only for states the kernel itself produces)."""

    ERROR = "error"
    WARNING = "warning"
    INFO = "info"
    IGNORE = "ignore"


@dataclass(frozen=True)
class Problem:
    code: str
    name: str
    severity: Severity
    title: str  # the short description, as in "<path>: <title>"
    prompt: Optional[str]  # the fix question ("Remove whiteout"); None: no automatic fix
    preen_ok: bool  # -p may apply the fix without asking
    kernel: str  # what the 6.18 kernel does / prints (overlay-format.md)
    doc: str  # why it happens and what the fix does
    compat: Optional[tuple[str, str]] = None  # fsck.overlay's (description, question)


_P = Problem
CATALOG: tuple[Problem, ...] = (
    # ------------------------------------------------------------------ whiteouts
    _P(
        "OVL101", "orphan-whiteout", Severity.ERROR,
        "orphan whiteout: nothing beneath it to hide",
        "Remove whiteout", True,
        "Harmless to lookups; readdir filters it. It is left behind when the lower entry it "
        "covered was removed offline, or by tools that write whiteouts blindly.",
        "A whiteout (a 0/0 character device, or a zero-size file with the `whiteout` xattr) "
        "hides an entry of a lower layer. When no layer beneath has an entry of that name "
        "(or only another whiteout), it hides nothing. In the lowermost layer every whiteout "
        "is orphan. The fix moves the whiteout to the quarantine. The kernel's shared "
        "whiteout inode (hard-linked from `work/index/#N`) is normal and never reported.",
        ("Orphan whiteout", "Remove"),
    ),
    _P(
        "OVL102", "whiteout-in-opaque-dir", Severity.ERROR,
        "whiteout inside an opaque directory",
        "Remove whiteout", True,
        "An opaque directory already hides everything beneath it; the kernel documentation "
        "says it should not contain whiteouts.",
        "The whiteout has no effect because its directory is opaque (`opaque=y`). The fix "
        "moves it to the quarantine.",
        ("Orphan whiteout", "Remove"),
    ),
    _P(
        "OVL103", "whiteout-in-pure-dir", Severity.ERROR,
        "whiteout in a directory that is not merged with any lower directory",
        "Remove whiteout", True,
        "readdir of a pure upper directory does not filter whiteouts: `ls` shows the name as "
        "`c?????????` while lookups return ENOENT (H21).",
        "The directory exists only in this layer and has no lower counterpart, so there is "
        "nothing to hide and the kernel lists the whiteout as a broken entry. The fix moves "
        "it to the quarantine.",
        ("Orphan whiteout", "Remove"),
    ),
    _P(
        "OVL104", "xwhiteout-in-upper", Severity.ERROR,
        "xattr whiteout in the upper layer",
        "Replace with a character-device whiteout", True,
        "Lookup treats it as a whiteout, but readdir of the upper never filters xattr "
        "whiteouts, so the name is listed and cannot be opened (X2).",
        "Zero-size files with the `whiteout` xattr are only filtered by readdir in lower "
        "layers whose directory carries `opaque=x`. In the upper the kernel's own 0/0 "
        "character device is the right form; the fix replaces the file with one (the old "
        "file goes to the quarantine).",
    ),
    _P(
        "OVL105", "xwhiteout-unmarked-dir", Severity.ERROR,
        "xattr whiteout in a lower directory without opaque=x",
        "Set opaque=x on the directory", True,
        "Lookup treats it as a whiteout, but readdir lists the name, which then cannot be "
        "opened (ENOENT) (X1 dir `e`).",
        "readdir filters xattr whiteouts only in directories marked `opaque=x` in that lower "
        "layer. The fix sets the marker on the directory.",
    ),
    # ------------------------------------------------------------------ opaque
    _P(
        "OVL201", "opaque-invalid-value", Severity.ERROR,
        "opaque xattr with a value the kernel ignores",
        "Remove the opaque xattr", True,
        "Only the 1-byte values `y` (and `x` on lower directories) mean anything; any other "
        "value is ignored and the directory is NOT opaque (H12a, H12b).",
        "The marker claims something the kernel does not do. Removing it keeps exactly what "
        "the kernel shows today. If the directory was meant to be opaque, set `opaque=y` by "
        "hand instead.",
    ),
    _P(
        "OVL202", "opaque-on-non-directory", Severity.ERROR,
        "opaque xattr on something that is not a directory",
        "Remove the opaque xattr", True,
        "Ignored on non-directories.",
        "Only directories can be opaque. The stray xattr is removed; nothing visible changes.",
    ),
    _P(
        "OVL203", "opaque-x-in-upper", Severity.ERROR,
        "opaque=x on an upper directory",
        "Remove the opaque xattr", True,
        "`x` marks xattr-whiteout directories in lower layers only; on the upper it has no "
        "meaning (H12d, X2).",
        "The marker is removed; nothing visible changes. If the directory was meant to be "
        "opaque, set `opaque=y` by hand instead.",
    ),
    # ------------------------------------------------------------------ redirects
    _P(
        "OVL301", "redirect-malformed", Severity.ERROR,
        "malformed redirect xattr",
        "Remove redirect", True,
        "`invalid redirect (%s)`; the lookup fails with EINVAL and the directory is "
        "inaccessible (H1b-H1d).",
        "A redirect is either a bare name (no `/`) or an absolute path with no empty "
        "component and no trailing `/`; an empty value is invalid. The fix removes it; if a "
        "directory of the same name exists beneath, a follow-up question offers to make the "
        "directory opaque so that it does not start merging with it (-y: yes, -p: no).",
        ("Invalid redirect directory", "Remove redirect"),
    ),
    _P(
        "OVL302", "redirect-escapes-layer", Severity.ERROR,
        "redirect that would leave the layer",
        "Remove redirect", True,
        "A `..` or `.` component, a NUL byte or a value longer than redirect_max (256) is "
        "never followed: on 6.18 a value like `/x/../y` makes the directory silently stop "
        "merging.",
        "ovlfsck never follows or acts on such a path (the old fsck.overlay created files "
        "outside the layer, D3). The fix removes the redirect.",
        ("Invalid redirect directory", "Remove redirect"),
    ),
    _P(
        "OVL303", "redirect-dangling", Severity.ERROR,
        "redirect to a directory that does not exist beneath",
        "Remove redirect", True,
        "No message: the directory silently stops merging and its lower content disappears "
        "(H1a).",
        "The directory the redirect names is in no lower layer (the lower was changed "
        "offline, or the value is corrupt). The fix removes the redirect, with the same "
        "follow-up question as for a malformed one.",
        ("Invalid redirect directory", "Remove redirect"),
    ),
    _P(
        "OVL304", "redirect-not-directory", Severity.ERROR,
        "redirect to something that is not a directory",
        "Remove redirect", True,
        "No merge, no message (H1e).",
        "The redirect target exists but is not a directory. The fix removes the redirect.",
        ("Invalid redirect directory", "Remove redirect"),
    ),
    _P(
        "OVL305", "redirect-to-self", Severity.IGNORE,
        "redirect to the directory's own path",
        "Remove redirect", True,
        "Harmless: the lookup finds the same lower directory with or without it. The kernel "
        "itself leaves one behind when a directory is renamed and then renamed back.",
        "Not reported by default, since the kernel writes it itself; `--severity "
        "redirect-to-self=info` lists them. Removing one changes nothing the kernel shows.",
    ),
    _P(
        "OVL306", "redirect-missing-whiteout", Severity.ERROR,
        "renamed directory's old location is not covered by a whiteout",
        "Add whiteout at the old location", True,
        "The lower directory shows up twice: at its old path and at the redirect; with "
        "index=off the second lookup fails `failed to get inode (-116)` (H1f).",
        "A directory rename writes a redirect on the new name and a whiteout at the old one "
        "(one atomic RENAME_WHITEOUT). When the whiteout is missing (a crash, or a copy that "
        "dropped it) the fix creates it at the old location, creating missing parent "
        "directories in this layer if needed. The message names the old location, where the "
        "whiteout goes (the old fsck.overlay named the redirect directory, D10).",
        ("Missing whiteout", "Add"),
    ),
    _P(
        "OVL307", "redirect-duplicate", Severity.ERROR,
        "two directories redirect to the same lower directory",
        "Remove redirect from the directory that does not match", True,
        "index=off: the second lookup fails `failed to get inode (-116)`; nfs_export: "
        "`suspected multiply redirected dir found` and EIO (H1f, H19c).",
        "Only one directory can own a lower directory. ovlfsck keeps the redirect of the "
        "directory whose origin file handle matches the lower directory and removes the "
        "other(s). When the handles do not tell (both or neither match), nothing is guessed: "
        "-p leaves it (exit 4) and -y removes all redirects but the first in path order, "
        "saying so. Directory read order never decides (the old fsck.overlay kept a forged "
        "redirect and emptied the real one, D4).",
        ("Duplicate redirect directory", "Remove redirect"),
    ),
    _P(
        "OVL308", "redirect-target-still-merged", Severity.ERROR,
        "redirect to a lower directory that is still merged at its own path",
        "Resolve the duplicate merge", True,
        "The lower directory is merged twice; the second lookup fails ESTALE (H1f).",
        "A directory in this layer at the old location is a plain (non-opaque) directory, so "
        "the lower directory is merged both there and at the redirect. When the origin "
        "handles tell which one is the renamed directory, the other loses its claim (the "
        "redirect is removed, or the plain directory is made opaque); otherwise -p leaves it "
        "and -y removes the redirect, as fsck.overlay does.",
        ("Duplicate redirect directory", "Remove redirect"),
    ),
    _P(
        "OVL309", "redirect-in-lowermost", Severity.ERROR,
        "redirect on a directory in the lowermost layer",
        "Remove redirect", True,
        "Never read: nothing lies beneath the lowermost layer.",
        "The redirect points nowhere. The fix removes it (lower layers are repaired only with "
        "--repair-lowers).",
        ("Invalid redirect directory", "Remove redirect"),
    ),
    _P(
        "OVL310", "redirect-on-non-directory", Severity.IGNORE,
        "redirect xattr on a file that is not a metacopy file",
        "Remove redirect", True,
        "Ignored: a redirect on a regular file is read only when the file is a metacopy file. "
        "The kernel itself leaves one behind: a metacopy file renamed with metacopy=on gets a "
        "redirect, and a later data copy-up removes `metacopy` but keeps the redirect.",
        "Not reported by default (kernel-made and harmless); `--severity "
        "redirect-on-non-directory=warning` lists them. Removing one changes nothing visible.",
    ),
    _P(
        "OVL311", "opaque-after-redirect-removal", Severity.INFO,
        "directory would merge with a same-name directory once its redirect is removed",
        "Make the directory opaque", False,
        "Without its redirect the directory merges with the lower directory of its own name.",
        "A follow-up question, asked only after a redirect was removed: making the directory "
        "opaque keeps lower content it never showed from appearing in it. -y answers yes, "
        "-p no (as fsck.overlay does); declining it is not a problem.",
        ("Should set opaque dir", ""),
    ),
    # ------------------------------------------------------------------ impure
    _P(
        "OVL401", "missing-impure", Severity.ERROR,
        "directory lacks the impure xattr",
        "Set impure", True,
        "No error, but readdir returns d_ino values that differ from st_ino for copied-up "
        "entries (H8b); with uuid=auto the root's impure also marks an old overlay.",
        "A directory must be marked impure when it holds a child with an origin xattr (any "
        "file type, symlinks and devices included), a redirected directory, or a merged "
        "directory. The fix sets `impure=y`.",
        ("Missing impure xattr", "Fix"),
    ),
    # ------------------------------------------------------------------ index
    _P(
        "OVL601", "index-bad-name", Severity.ERROR,
        "index entry whose name is not a valid file handle",
        "Move the entry to the quarantine", True,
        "Mount fails: `failed to verify index (index/%s, ftype=%x, err=-22)` (or err=-61), "
        "`failed index dir cleanup`, `try deleting index dir or mounting with '-o index=off' "
        "to disable inodes index.` (H5a-e)",
        "Every entry of work/index other than `#N` temporaries is named by the hex of an "
        "overlay file handle (at least 42 hex digits, magic 0xfb, version 0). The kernel "
        "refuses to mount with index=on otherwise; the old fsck.overlay called such a layer "
        "set clean (D9). The fix moves the entry to the quarantine.",
    ),
    # ------------------------------------------------------------------ layout
    _P(
        "OVL901", "unreadable-entry", Severity.ERROR,
        "entry or directory cannot be read",
        None, False,
        "The kernel's lookup or readdir would fail there too.",
        "A directory could not be listed or an entry's attributes could not be read (I/O "
        "error, permissions). It was skipped; nothing beneath it was checked.",
    ),
)

# Each issue-3 area keeps its rows next to nothing else, so areas can grow independently.
from ovlfsck import problems_handles, problems_index, problems_metacopy, problems_workdir  # noqa: E402

CATALOG = (
    CATALOG
    + problems_handles.ROWS
    + problems_index.ROWS
    + problems_workdir.ROWS
    + problems_metacopy.ROWS
)
CATALOG = tuple(sorted(CATALOG, key=lambda p: p.code))

BY_CODE: dict[str, Problem] = {p.code: p for p in CATALOG}
BY_NAME: dict[str, Problem] = {p.name: p for p in CATALOG}


def lookup(key: str) -> Optional[Problem]:
    """A problem by code (case-insensitive) or name."""
    return BY_CODE.get(key.upper()) or BY_NAME.get(key.lower())


def markdown() -> str:
    """docs/problems.md, generated from the catalog."""
    lines = [
        "# Problem catalog",
        "",
        "Generated from `ovlfsck/problems.py` by `make docs` (`ovlfsck problems --markdown`);",
        "a test fails when this file is out of date. `ovlfsck explain CODE` prints one entry.",
        "",
        "Severity `error` is counted in the exit code and fixed by `-y` (and by `-p` when the",
        "fix is preen-safe); `warning` and `info` are reported only. Change a severity with",
        "`--severity NAME=error|warning|info|ignore`. A default of `ignore` marks a state the",
        "kernel itself produces: checked, reported only when asked for.",
        "",
        "| code | name | severity | fix | -p |",
        "|---|---|---|---|---|",
    ]
    for p in CATALOG:
        lines.append(
            f"| {p.code} | `{p.name}` | {p.severity.value} | {p.prompt or '—'} | "
            f"{'yes' if p.preen_ok and p.prompt else 'no'} |"
        )
    lines.append("")
    for p in CATALOG:
        lines.append(explain(p, heading="## "))
    return "\n".join(lines)


def explain(p: Problem, heading: str = "") -> str:
    parts = [
        f"{heading}{p.code} {p.name}",
        "",
        f"{p.title[0].upper()}{p.title[1:]}. Default severity: {p.severity.value}.",
        "",
        f"**Kernel:** {p.kernel}",
        "",
        f"**Details:** {p.doc}",
        "",
        f"**Fix:** {p.prompt + ('' if p.preen_ok else ' (not under -p)') if p.prompt else 'none; reported only.'}",
        "",
    ]
    if p.compat:
        parts += [f"fsck.overlay calls it `{p.compat[0]}` (`{p.compat[1]}?`).", ""]
    return "\n".join(parts)
