"""The `fsck.overlay` front end against states made by the real kernel (prior-art §2.2-§2.6).

Claim under test: every repair of the §2.5 repair summary gives the same end state and exit
code as hisilicon's fsck.overlay wherever fsck.overlay is right, through the fsck.overlay
front end with -n, -p and -y.

Each scenario builds its layers with the kernel (mount, run file operations through the
overlay, unmount), records the merged view the kernel showed, then damages the layers
offline (setfattr/mknod/rm, done here with os/xattr calls). For every mode the state is
built afresh (nothing is shared between modes). Then `fsck.overlay <mode> -o ...` runs and
the test asserts:

* the exact problem lines (`Orphan whiteout: "nosuch" in upperdir Remove? n`), compared as
  a multiset: the old tool printed in readdir order, ovlfsck in path order, neither is part
  of the contract;
* the exit code (§2.3: -n 4 when problems; -p 1 when everything had default "y", 4 when
  something with default "n" is left; -y 1) and the closing lines;
* the end state on disk; -n changes nothing at all;
* a second `-n` run: exit 0 after -y (and after a -p that fixed everything);
* the kernel mounts the result and shows the expected merged view.

Where ovlfsck deliberately differs because fsck.overlay is wrong (prior-art §2.8 D-defects),
ovlfsck's documented behaviour is asserted and a comment says so.
"""
from __future__ import annotations

import os
import stat
import subprocess
import sys
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional

import pytest

from . import kutil

pytestmark = [
    pytest.mark.kernel,
    pytest.mark.skipif(kutil.can_use_kernel() is not None,
                       reason=f"kernel tests need: {kutil.can_use_kernel()}"),
]

X = "trusted.overlay."
CLEAN = "Filesystem clean"
MODIFIED = "File system was modified!"
LEFT = "Still have unexpected inconsistency!"
ABORT = ["Cannot continue, aborting!", "Filesystem check failed, may not clean!"]
CLOSING = {CLEAN, MODIFIED, LEFT, *ABORT}


# --------------------------------------------------------------------------- running


def _script(name: str) -> list[str]:
    """The console script next to this interpreter (.venv/bin/<name>), or an equivalent."""
    p = Path(sys.executable).parent / name
    if p.exists():
        return [str(p)]
    module = "ovlfsck.fsck_compat" if name == "fsck.overlay" else "ovlfsck.cli"
    return [sys.executable, "-c", f"from {module} import main; main()"]


def _env(state_dir: Path) -> dict:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(
        [str(kutil.REPO_ROOT)] + ([env["PYTHONPATH"]] if env.get("PYTHONPATH") else []))
    env["LC_ALL"] = "C.UTF-8"
    # Journals of lower-only stacks go here instead of /var/lib/ovlfsck.
    env["OVLFSCK_STATE_DIR"] = str(state_dir)
    return env


def run_tool(name: str, *args, state_dir: Path, stdin=subprocess.DEVNULL, cwd=None,
             input: Optional[str] = None) -> subprocess.CompletedProcess:
    state_dir.mkdir(parents=True, exist_ok=True)
    kw = {"input": input} if input is not None else {"stdin": stdin}
    p = subprocess.run([*_script(name), *map(os.fspath, args)], capture_output=True, text=True,
                       timeout=120, env=_env(state_dir), cwd=cwd, **kw)
    assert "Traceback" not in p.stderr and "Traceback" not in p.stdout, (
        f"{name} {' '.join(map(str, args))} printed a traceback:\n{p.stderr}")
    return p


def fsck_overlay(*args, state_dir: Path, **kw) -> subprocess.CompletedProcess:
    return run_tool("fsck.overlay", *args, state_dir=state_dir, **kw)


def ovlfsck(*args, state_dir: Path, **kw) -> subprocess.CompletedProcess:
    return run_tool("ovlfsck", *args, state_dir=state_dir, **kw)


def split_output(stdout: str) -> tuple[list[str], list[str]]:
    """(problem lines, closing lines) of a fsck.overlay run."""
    lines = stdout.splitlines()
    problems = [line for line in lines if line not in CLOSING]
    closing = [line for line in lines if line in CLOSING]
    return problems, closing


def show(p: subprocess.CompletedProcess) -> str:
    return (f"exit {p.returncode}\n--- stdout ---\n{p.stdout}--- stderr ---\n{p.stderr}")


def closing_lines(modified: bool, rc: int) -> list[str]:
    """What fsck.overlay prints last (§2.3)."""
    out = [MODIFIED] if modified else []
    if rc & 4:
        out.append(LEFT)
    if rc & 8:
        out += ABORT
    if not rc & 12:
        out.append(CLEAN)
    return out


# --------------------------------------------------------------------------- layers


@dataclass
class Layers:
    base: Path
    lowers: list[Path]
    upper: Optional[Path]
    work: Optional[Path]
    mount_opts: str = ""
    pristine: dict = field(default_factory=dict)  # the kernel's merged view before damage
    extra: dict = field(default_factory=dict)

    @property
    def o(self) -> str:
        return kutil.overlay_options(self.lowers, self.upper, self.work)

    @property
    def state(self) -> Path:
        return self.base / "state"

    def all_dirs(self) -> dict[str, Path]:
        d = {f"lower{i}": p for i, p in enumerate(self.lowers)}
        if self.upper is not None:
            d.update(upper=self.upper, work=self.work)
        return d

    def snapshot(self) -> dict:
        return {k: kutil.layer_snapshot(p) for k, p in self.all_dirs().items()}

    @contextmanager
    def mounted(self, options: Optional[str] = None):
        opts = self.mount_opts if options is None else options
        with kutil.mount_overlay(self.lowers, self.upper, self.work, self.base / "mnt",
                                 opts) as m:
            yield Path(m)

    def view(self, options: Optional[str] = None) -> dict:
        with self.mounted(options) as m:
            return kutil.merged_view(m)

    def fsck(self, *args, **kw) -> subprocess.CompletedProcess:
        return fsck_overlay(*args, "-o", self.o, state_dir=self.state, **kw)


def make_layers(base: Path, n_lowers: int = 1, upper: bool = True, mount_opts: str = "") -> Layers:
    base.mkdir(parents=True, exist_ok=True)
    lowers = []
    for i in range(n_lowers):
        (base / f"l{i}").mkdir()
        lowers.append(base / f"l{i}")
    u = w = None
    if upper:
        u, w = base / "upper", base / "work"
        u.mkdir()
        w.mkdir()
    return Layers(base, lowers, u, w, mount_opts)


def files(root: Path, spec: dict) -> None:
    """Create files ("text") and directories (nested dicts) under root."""
    for name, val in spec.items():
        p = root / name
        if isinstance(val, dict):
            p.mkdir(parents=True, exist_ok=True)
            files(p, val)
        else:
            p.parent.mkdir(parents=True, exist_ok=True)
            p.write_text(val)


@contextmanager
def kernel_session(L: Layers):
    """Mount, let the body work through the overlay, record the view, unmount."""
    with L.mounted() as m:
        yield m
        L.pristine = kutil.merged_view(m)


def whiteout(p: Path) -> None:
    os.mknod(p, stat.S_IFCHR | 0o000, os.makedev(0, 0))


def is_whiteout(p: Path) -> bool:
    try:
        st = os.lstat(p)
    except FileNotFoundError:
        return False
    return stat.S_ISCHR(st.st_mode) and st.st_rdev == 0


def getx(p: Path, name: str) -> Optional[bytes]:
    try:
        return os.getxattr(p, X + name, follow_symlinks=False)
    except OSError:
        return None


def setx(p: Path, name: str, value: bytes) -> None:
    os.setxattr(p, X + name, value, follow_symlinks=False)


def delx(p: Path, name: str) -> None:
    os.removexattr(p, X + name, follow_symlinks=False)


def dino_mismatches(mnt: Path) -> list[str]:
    """Entries of the mounted overlay whose readdir d_ino differs from st_ino.

    The kernel keeps them equal for copied-up entries only in directories marked impure
    (prior-art §2.5 impure; H8b)."""
    bad = []
    for dirpath, dirnames, filenames in os.walk(mnt):
        for e in os.scandir(dirpath):
            if e.inode() != os.lstat(e.path).st_ino:
                bad.append(os.path.relpath(e.path, mnt))
    return bad


# --------------------------------------------------------------------------- expectations


@dataclass(frozen=True)
class Q:
    """One problem line: `<desc>: "<path>" in <layer> <question>? <answer>`."""

    desc: str
    path: str
    layer: str
    question: str
    preen: bool = True  # the -p default answer is "y"

    def line(self, answer: str) -> str:
        if self.question:
            return f'{self.desc}: "{self.path}" in {self.layer} {self.question}? {answer}'
        return f'{self.desc}: "{self.path}" in {self.layer} ? {answer}'


def orphan(path, layer="upperdir"):
    return Q("Orphan whiteout", path, layer, "Remove")


def invalid_redirect(path, layer="upperdir"):
    return Q("Invalid redirect directory", path, layer, "Remove redirect")


def duplicate(path, layer="upperdir"):
    return Q("Duplicate redirect directory", path, layer, "Remove redirect", preen=False)


def missing_whiteout(path, layer="upperdir"):
    return Q("Missing whiteout", path, layer, "Add")


def missing_impure(path, layer="upperdir"):
    return Q("Missing impure xattr", path, layer, "Fix")


def set_opaque(path, layer="upperdir"):
    return Q("Should set opaque dir", path, layer, "", preen=False)


@dataclass
class Scenario:
    name: str
    build: Callable[[Path], Layers]
    problems: list[Q]  # reported in every mode
    # follow-up lines that appear only when the fix was applied (-p: only if preen)
    fixed_followups: list[Q] = field(default_factory=list)
    yes_only: list[Q] = field(default_factory=list)  # printed (answered y) only under -y
    after: Optional[Callable[[Layers, str], None]] = None  # disk state after -p / -y
    view: Optional[Callable[[Layers, dict, str], None]] = None  # merged view after -p / -y

    def expected_lines(self, mode: str) -> list[str]:
        if mode == "-n":
            return [q.line("n") for q in self.problems]
        if mode == "-y":
            return [q.line("y") for q in self.problems + self.fixed_followups + self.yes_only]
        out = [q.line("y" if q.preen else "n") for q in self.problems]
        # A follow-up question is asked once its fix was applied; -p answers it inline
        # with its default (fsck.overlay prints every answered question).
        out += [q.line("y" if q.preen else "n") for q in self.fixed_followups + self.yes_only]
        return out

    def expected_rc(self, mode: str) -> int:
        if not self.problems:
            return 0
        if mode == "-n":
            return 4
        if mode == "-y":
            return 1
        return 4 if any(not q.preen for q in self.problems) else 1


# --------------------------------------------------------------------------- scenarios


def build_orphans(base: Path) -> Layers:
    """Orphan whiteouts in the upper and in both lower layers (the front end repairs lowers)."""
    L = make_layers(base, n_lowers=2)
    files(L.lowers[0], {"keep0": "k0\n"})
    whiteout(L.lowers[0] / "gone")  # a valid middle-layer whiteout over l1/gone
    files(L.lowers[1], {"f": "f\n", "gone": "g\n", "dir": {"g": "g\n"}})
    with kernel_session(L) as m:
        os.unlink(m / "f")  # the kernel's whiteout upper/f: valid
        (m / "new").write_text("new\n")
    # damage
    whiteout(L.upper / "nosuch")  # nothing beneath
    whiteout(L.upper / "gone")  # over the middle-layer whiteout: orphan (§2.5)
    whiteout(L.lowers[0] / "lnosuch")  # nothing beneath in lowerdir-1
    whiteout(L.lowers[1] / "bottom")  # in the bottom-most layer: always orphan
    whiteout(L.lowers[1] / "dir" / "wh")
    return L


def after_orphans(L: Layers, mode: str) -> None:
    for p in (L.upper / "nosuch", L.upper / "gone", L.lowers[0] / "lnosuch",
              L.lowers[1] / "bottom", L.lowers[1] / "dir" / "wh"):
        assert not os.path.lexists(p), f"{p} still there"
    assert is_whiteout(L.upper / "f"), "the kernel's valid whiteout was removed"
    assert is_whiteout(L.lowers[0] / "gone"), "a valid middle-layer whiteout was removed"
    assert (L.lowers[1] / "gone").read_text() == "g\n"


def build_invalid_redirects(base: Path) -> Layers:
    L = make_layers(base, mount_opts="redirect_dir=on")
    files(L.lowers[0], {"c": "c\n", "dd": {"ddf": "d\n"}})
    with kernel_session(L) as m:
        os.rename(m / "dd", m / "dd2")  # kernel-made redirect: valid, must stay
        (m / "r1").mkdir()
        (m / "r1" / "keep").write_text("r1\n")
        (m / "r2").mkdir()
    # The kernel made r1 and r2 opaque (new dirs in a merged dir); a redirect on an opaque
    # dir is never read by the kernel, and ovlfsck does not look at it either. Drop it.
    for d in ("r1", "r2"):
        assert getx(L.upper / d, "opaque") == b"y"
        delx(L.upper / d, "opaque")
    setx(L.upper / "r1", "redirect", b"/nonexistent")  # target missing
    setx(L.upper / "r2", "redirect", b"/c")  # target not a directory
    return L


def after_invalid_redirects(L: Layers, mode: str) -> None:
    assert getx(L.upper / "r1", "redirect") is None
    assert getx(L.upper / "r2", "redirect") is None
    assert getx(L.upper / "r1", "opaque") is None and getx(L.upper / "r2", "opaque") is None
    assert getx(L.upper / "dd2", "redirect") == b"dd"
    assert is_whiteout(L.upper / "dd")


def build_lower_only(base: Path) -> Layers:
    """A lower-only stack of 2 lowers: orphan whiteouts in both, redirects in both."""
    L = make_layers(base, n_lowers=2, upper=False)
    files(L.lowers[0], {"a0": "a0\n", "mid": {"m": "m\n"}})
    files(L.lowers[1], {"a1": "a1\n", "sub": {"s": "s\n"}, "bot": {"b": "b\n"}})
    L.pristine = L.view()
    whiteout(L.lowers[0] / "w0")  # nothing beneath
    whiteout(L.lowers[1] / "w1")  # bottom-most layer
    setx(L.lowers[1] / "bot", "redirect", b"/sub")  # a redirect in the bottom layer
    setx(L.lowers[0] / "mid", "redirect", b"/nowhere")  # target missing
    return L


def after_lower_only(L: Layers, mode: str) -> None:
    assert not os.path.lexists(L.lowers[0] / "w0")
    assert not os.path.lexists(L.lowers[1] / "w1")
    assert getx(L.lowers[1] / "bot", "redirect") is None
    assert getx(L.lowers[0] / "mid", "redirect") is None
    assert getx(L.lowers[0] / "mid", "opaque") is None  # nothing of that name beneath


def build_missing_whiteout(base: Path) -> Layers:
    L = make_layers(base, mount_opts="redirect_dir=on")
    files(L.lowers[0], {"b": {"g": "g\n", "bsub": {"y": "y\n"}}})
    with kernel_session(L) as m:
        os.rename(m / "b", m / "b2")
    assert getx(L.upper / "b2", "redirect") == b"b" and is_whiteout(L.upper / "b")
    os.unlink(L.upper / "b")  # the covering whiteout is lost
    return L


def after_missing_whiteout(L: Layers, mode: str) -> None:
    assert is_whiteout(L.upper / "b"), "no whiteout at the redirect's origin path"
    assert getx(L.upper / "b2", "redirect") == b"b"


def build_missing_whiteout_nested(base: Path) -> Layers:
    L = make_layers(base, mount_opts="redirect_dir=on")
    files(L.lowers[0], {"p": {"q": {"dir": {"z": "z\n", "sub": {}}}}})
    with kernel_session(L) as m:
        os.rename(m / "p" / "q" / "dir", m / "top")
    assert getx(L.upper / "top", "redirect") == b"/p/q/dir"
    subprocess.run(["rm", "-rf", str(L.upper / "p")], check=True)  # parents gone too
    return L


def after_missing_whiteout_nested(L: Layers, mode: str) -> None:
    assert is_whiteout(L.upper / "p" / "q" / "dir")
    assert getx(L.upper / "top", "redirect") == b"/p/q/dir"
    assert getx(L.upper / "p", "impure") == b"y"  # p now holds the merged directory q


def build_impure_origin(base: Path) -> Layers:
    L = make_layers(base)
    files(L.lowers[0], {"a": {"f1": "f1\n", "f2": "f2\n"}})
    with kernel_session(L) as m:
        with open(m / "a" / "f1", "a") as f:
            f.write("more\n")
    assert getx(L.upper / "a" / "f1", "origin") and getx(L.upper / "a", "impure") == b"y"
    delx(L.upper / "a", "impure")
    return L


def after_impure(path: str):
    def check(L: Layers, mode: str) -> None:
        assert getx(L.upper / path, "impure") == b"y"
    return check


def view_pristine_and_dino(L: Layers, view: dict, mode: str) -> None:
    assert view == L.pristine, kutil.diff_views(L.pristine, view, names=("kernel", "repaired"))
    with L.mounted() as m:
        assert dino_mismatches(m) == []


def build_impure_redirect(base: Path) -> Layers:
    L = make_layers(base, mount_opts="redirect_dir=on")
    files(L.lowers[0], {"p": {"b": {"g": "g\n"}, "other": "o\n"}})
    with kernel_session(L) as m:
        os.rename(m / "p" / "b", m / "p" / "b2")
    assert getx(L.upper / "p" / "b2", "redirect") == b"b"
    delx(L.upper / "p", "impure")
    # Leave the redirect as the only reason for p to be impure (§2.5 (b)).
    delx(L.upper / "p" / "b2", "origin")
    return L


def build_opaque_followup(base: Path, target_kind: str) -> Layers:
    """`rm -rf x; mv src x` by the kernel, then lower `src` removed/replaced offline."""
    L = make_layers(base, mount_opts="redirect_dir=on")
    files(L.lowers[0], {"src": {"sf": "s\n"}, "x": {"xf": "x\n"}})
    with kernel_session(L) as m:
        subprocess.run(["rm", "-rf", str(m / "x")], check=True)
        os.rename(m / "src", m / "x")
    assert getx(L.upper / "x", "redirect") == b"src" and is_whiteout(L.upper / "src")
    subprocess.run(["rm", "-rf", str(L.lowers[0] / "src")], check=True)
    if target_kind == "file":
        (L.lowers[0] / "src").write_text("now a file\n")
    return L


def after_opaque_followup(L: Layers, mode: str) -> None:
    assert getx(L.upper / "x", "redirect") is None
    # fsck.overlay: -y answers "Should set opaque dir" with yes, -p with no (§2.5).
    assert getx(L.upper / "x", "opaque") == (b"y" if mode == "-y" else None)


def view_opaque_followup(L: Layers, view: dict, mode: str) -> None:
    names = sorted(k for k in view if k.startswith("x/"))
    if mode == "-y":
        assert names == [], "x was made opaque: the lower x must stay hidden"
    else:
        assert names == ["x/xf"], "without opaque, x merges with the lower x again"


def build_duplicate(base: Path) -> Layers:
    """Two redirects to one lower dir and no origin evidence, plus an orphan whiteout."""
    L = make_layers(base, mount_opts="redirect_dir=on")
    files(L.lowers[0], {"b": {"g": "g\n"}})
    with kernel_session(L) as m:
        os.rename(m / "b", m / "x1")
    delx(L.upper / "x1", "origin")
    (L.upper / "x2").mkdir()
    setx(L.upper / "x2", "redirect", b"/b")
    whiteout(L.upper / "nosuch")
    return L


def after_duplicate(L: Layers, mode: str) -> None:
    assert not os.path.lexists(L.upper / "nosuch")
    assert getx(L.upper / "x1", "redirect") == b"b"
    # fsck.overlay keeps whichever its readdir met first (D4); ovlfsck, with no origin
    # evidence, leaves it under -p and under -y keeps the first in path order (OVL307).
    assert getx(L.upper / "x2", "redirect") == (None if mode == "-y" else b"/b")


def view_duplicate(L: Layers, view: dict, mode: str) -> None:
    assert view.get("x1/g", (None,))[0] == "f"
    assert view["x2"][0] == "d" and not any(k.startswith("x2/") for k in view)
    assert "nosuch" not in view


def build_still_merged(base: Path) -> Layers:
    """A redirect whose origin path is still a plain (merging) upper dir, no evidence."""
    L = make_layers(base, mount_opts="redirect_dir=on")
    files(L.lowers[0], {"b": {"g": "g\n", "bsub": {}}})
    with kernel_session(L) as m:
        os.rename(m / "b", m / "b2")
    os.unlink(L.upper / "b")
    (L.upper / "b").mkdir()
    (L.upper / "b" / "ub").write_text("ub\n")
    delx(L.upper / "b2", "origin")
    return L


def after_still_merged(L: Layers, mode: str) -> None:
    if mode == "-y":
        assert getx(L.upper / "b2", "redirect") is None
    else:
        assert getx(L.upper / "b2", "redirect") == b"b"
    assert getx(L.upper / "b", "opaque") is None


def view_still_merged(L: Layers, view: dict, mode: str) -> None:
    assert sorted(k for k in view if k.startswith("b/") or k.startswith("b2")) == [
            "b/bsub", "b/g", "b/ub", "b2"]


def view_pristine(L: Layers, view: dict, mode: str) -> None:
    assert view == L.pristine, kutil.diff_views(L.pristine, view, names=("kernel", "repaired"))


SCENARIOS = [
    Scenario(
        "orphan-whiteouts", build_orphans,
        [orphan("nosuch"), orphan("gone"), orphan("lnosuch", "lowerdir-0"),
         orphan("bottom", "lowerdir-1"), orphan("dir/wh", "lowerdir-1")],
        after=after_orphans, view=view_pristine,
    ),
    Scenario(
        "invalid-redirects", build_invalid_redirects,
        [invalid_redirect("r1"), invalid_redirect("r2")],
        after=after_invalid_redirects, view=view_pristine,
    ),
    Scenario(
        "lower-only-2-lowers", build_lower_only,
        [orphan("w0", "lowerdir-0"), orphan("w1", "lowerdir-1"),
         invalid_redirect("bot", "lowerdir-1"), invalid_redirect("mid", "lowerdir-0")],
        after=after_lower_only, view=view_pristine,
    ),
    # Deliberate differences (D10, D5): fsck.overlay names the redirect dir ("b2") instead
    # of the path where the whiteout goes, and does not count a declined "Missing whiteout"
    # (-n exit 0 although -p/-y change the layer). ovlfsck names the origin path and -n
    # exits 4.
    Scenario(
        "missing-whiteout", build_missing_whiteout,
        [missing_whiteout("b")],
        after=after_missing_whiteout, view=view_pristine,
    ),
    # Deliberate difference: fsck.overlay fails with "Cannot mknod" and exit 8 when the
    # origin's parents are missing in the layer (§2.5 4.); ovlfsck creates them, and the new
    # upper dir p then needs impure (it holds the merged dir q), fixed in the next round.
    Scenario(
        "missing-whiteout-missing-parents", build_missing_whiteout_nested,
        [missing_whiteout("p/q/dir")],
        fixed_followups=[missing_impure("p")],
        after=after_missing_whiteout_nested, view=view_pristine,
    ),
    Scenario(
        "missing-impure-origin-child", build_impure_origin,
        [missing_impure("a")],
        after=after_impure("a"), view=view_pristine_and_dino,
    ),
    Scenario(
        "missing-impure-redirect-child", build_impure_redirect,
        [missing_impure("p")],
        after=after_impure("p"), view=view_pristine_and_dino,
    ),
    Scenario(
        "opaque-followup-target-missing", lambda b: build_opaque_followup(b, "missing"),
        [orphan("src"), invalid_redirect("x")],
        yes_only=[set_opaque("x")],
        after=after_opaque_followup, view=view_opaque_followup,
    ),
    Scenario(
        "opaque-followup-target-not-dir", lambda b: build_opaque_followup(b, "file"),
        [invalid_redirect("x")],
        yes_only=[set_opaque("x")],
        after=after_opaque_followup, view=view_opaque_followup,
    ),
    Scenario(
        "duplicate-redirect-no-evidence", build_duplicate,
        [duplicate("x2"), orphan("nosuch")],
        after=after_duplicate, view=view_duplicate,
    ),
    Scenario(
        "redirect-origin-still-merged", build_still_merged,
        [duplicate("b2")],
        after=after_still_merged, view=view_still_merged,
    ),
]


@pytest.mark.parametrize("mode", ["-n", "-p", "-y"])
@pytest.mark.parametrize("sc", SCENARIOS, ids=[s.name for s in SCENARIOS])
def test_repair_summary(tmp_path, sc: Scenario, mode: str):
    L = sc.build(tmp_path / "s")
    before = L.snapshot()
    p = L.fsck(mode)
    problems, closing = split_output(p.stdout)
    assert sorted(problems) == sorted(sc.expected_lines(mode)), show(p)
    rc = sc.expected_rc(mode)
    assert p.returncode == rc, show(p)
    modified = mode != "-n" and any(line.endswith("? y") for line in problems)
    assert closing == closing_lines(modified, rc), show(p)

    if mode == "-n":
        assert L.snapshot() == before, "-n changed the layers"
        assert not (L.state).exists() or not any(L.state.iterdir()), "-n wrote a journal"
        return

    if sc.after:
        sc.after(L, mode)
    again = L.fsck("-n")
    if rc == 1:
        assert again.returncode == 0 and again.stdout == CLEAN + "\n", show(again)
    else:
        assert again.returncode == 4, show(again)
    if rc == 1 and sc.view:  # what is left after an exit 4 is still damaged
        sc.view(L, L.view(), mode)


# --------------------------------------------------------------------------- single cases


def test_sample_scenario_3_1(tmp_path):
    """The §3.1 sample, kernel-made with index=on,redirect_dir=on, then all its damage.

    fsck.overlay -n printed 7 lines and exit 4; -p left the duplicate (exit 4); -y removed
    the kernel's own b2 redirect and the mount then failed on index/deadbeef. ovlfsck: the
    same problems with its documented deviations (D4: the origin handle keeps b2, so -p can
    fix the duplicate; D9: the junk index entry is reported and fixed; D10: the missing
    whiteout is named where it goes), and the kernel mounts the result.
    """
    def build(base):
        L = make_layers(base, mount_opts="index=on,redirect_dir=on")
        files(L.lowers[0], {"a": {"f1": "f1\n", "f2": "f2\n"}, "b": {"g": "g\n", "bsub": {"y": "y\n"}},
                            "c": "c\n", "d": {"sub": {"x": "x\n"}}, "e": {"e1": "e1\n"}})
        os.symlink("a", L.lowers[0] / "sym")
        with kernel_session(L) as m:
            with open(m / "a" / "f1", "a") as f:
                f.write("more\n")
            os.unlink(m / "a" / "f2")
            os.rename(m / "b", m / "b2")
            subprocess.run(["rm", "-rf", str(m / "d")], check=True)
            (m / "d").mkdir()
            os.utime(m / "e")
            os.unlink(m / "c")
        clean = L.fsck("-n")
        assert clean.returncode == 0 and clean.stdout == CLEAN + "\n", show(clean)
        whiteout(L.upper / "nosuch")
        whiteout(L.upper / "d" / "zzz")
        (L.upper / "r1").mkdir()
        setx(L.upper / "r1", "redirect", b"/nonexistent")
        delx(L.upper / "a", "impure")
        os.unlink(L.upper / "b")
        (L.upper / "b3").mkdir()
        setx(L.upper / "b3", "redirect", b"/b")
        whiteout(L.work / "index" / "deadbeef")
        return L

    common = [orphan("nosuch"), orphan("d/zzz"), invalid_redirect("r1"), missing_impure("a"),
              missing_whiteout("b"), Q("Duplicate redirect directory", "b3", "upperdir",
                                       "Remove redirect")]
    index_q = Q("Index entry whose name is not a valid file handle", "index/deadbeef", "workdir",
                "Move the entry to the quarantine")
    for mode in ("-n", "-p", "-y"):
        L = build(tmp_path / mode.strip("-"))
        p = L.fsck(mode)
        ans = "n" if mode == "-n" else "y"
        problems, closing = split_output(p.stdout)
        assert sorted(problems) == sorted(q.line(ans) for q in common + [index_q]), show(p)
        assert p.returncode == (4 if mode == "-n" else 1), show(p)
        assert closing == closing_lines(mode != "-n", p.returncode), show(p)
        if mode == "-n":
            continue
        assert L.fsck("-n").returncode == 0
        assert getx(L.upper / "b2", "redirect") == b"b"
        assert getx(L.upper / "b3", "redirect") is None
        view = L.view()
        assert view["b2/g"] == L.pristine["b2/g"] and "b2/bsub/y" in view
        assert not any(k.startswith("b3/") for k in view)
        for k in ("nosuch", "r1/x", "a/f2", "c"):
            assert k not in view


def test_root_path_is_dot(tmp_path):
    L = make_layers(tmp_path / "s", mount_opts="redirect_dir=on")
    files(L.lowers[0], {"b": {"g": "g\n"}})
    with kernel_session(L) as m:
        os.rename(m / "b", m / "b2")
    delx(L.upper, "impure")
    p = L.fsck("-n")
    assert p.returncode == 4, show(p)
    assert split_output(p.stdout)[0] == ['Missing impure xattr: "." in upperdir Fix? n'], show(p)


def test_no_impure_for_a_redirect_removed_in_the_same_run(tmp_path):
    L = make_layers(tmp_path / "s")
    files(L.lowers[0], {"f": "f\n"})
    with kernel_session(L) as m:
        (m / "r1").mkdir()
    if getx(L.upper / "r1", "opaque") is not None:
        delx(L.upper / "r1", "opaque")
    assert getx(L.upper, "impure") is None
    setx(L.upper / "r1", "redirect", b"/nonexistent")
    p = L.fsck("-y")
    assert p.returncode == 1, show(p)
    assert split_output(p.stdout)[0] == [invalid_redirect("r1").line("y")], show(p)
    assert getx(L.upper, "impure") is None


def test_opaque_followup_declined_line_under_p(tmp_path):
    L = build_opaque_followup(tmp_path / "s", "file")
    p = L.fsck("-p")
    assert p.returncode == 1, show(p)
    assert set_opaque("x").line("n") in split_output(p.stdout)[0], show(p)


def test_still_merged_with_origin_evidence(tmp_path):
    """Deliberate difference (D4): the kernel-made b2 carries an origin handle that matches
    the lower b, so the plain dir b loses the claim (made opaque) and -p may do it; the old
    tool asked "Remove redirect" on b2 with default n (-p exit 4)."""
    for mode in ("-p", "-y"):
        L = make_layers(tmp_path / mode.strip("-"), mount_opts="redirect_dir=on")
        files(L.lowers[0], {"b": {"g": "g\n", "bsub": {}}})
        with kernel_session(L) as m:
            os.rename(m / "b", m / "b2")
        os.unlink(L.upper / "b")
        (L.upper / "b").mkdir()
        (L.upper / "b" / "ub").write_text("ub\n")
        p = L.fsck(mode)
        assert p.returncode == 1, show(p)
        assert getx(L.upper / "b2", "redirect") == b"b"
        assert getx(L.upper / "b", "opaque") == b"y"
        assert L.fsck("-n").returncode == 0
        view = L.view()
        assert sorted(k for k in view if k.startswith("b")) == [
            "b", "b/ub", "b2", "b2/bsub", "b2/g"]


def test_still_merged_with_evidence_line_matches_the_fix(tmp_path):
    L = make_layers(tmp_path / "s", mount_opts="redirect_dir=on")
    files(L.lowers[0], {"b": {"g": "g\n"}})
    with kernel_session(L) as m:
        os.rename(m / "b", m / "b2")
    os.unlink(L.upper / "b")
    (L.upper / "b").mkdir()
    p = L.fsck("-y")
    assert p.returncode == 1, show(p)
    problems = split_output(p.stdout)[0]
    assert getx(L.upper / "b", "redirect") is None
    # The line must not claim to remove a redirect from b, which has none.
    assert not any('"b" in upperdir Remove redirect' in line for line in problems), show(p)


def test_interactive_defaults_from_dev_null(tmp_path):
    """§2.6: with stdin at /dev/null every question gets its default, like -p."""
    L = build_opaque_followup(tmp_path / "s", "missing")
    p = L.fsck()  # no -p/-n/-y: interactive
    assert p.returncode == 1, show(p)
    assert getx(L.upper / "x", "redirect") is None and getx(L.upper / "x", "opaque") is None
    assert not os.path.lexists(L.upper / "src")
    problems = split_output(p.stdout)[0]
    assert 'Orphan whiteout: "src" in upperdir Remove ? [y]: ' in problems, show(p)
    assert 'Invalid redirect directory: "x" in upperdir Remove redirect ? [y]: ' in problems
    assert not any(line.endswith("? y") for line in problems), show(p)
    assert not any("Fix ?" in line for line in problems if "opaque" in line), show(p)


# --------------------------------------------------------------------------- mounted


def test_mounted_n_checks_y_refuses(tmp_path):
    """§3.2: mounted with absolute paths: -n checks (clean, 0), -y aborts with exit 8."""
    L = make_layers(tmp_path / "s")
    files(L.lowers[0], {"f": "f\n"})
    with L.mounted():
        p = L.fsck("-n")
        assert p.returncode == 0 and split_output(p.stdout) == ([], [CLEAN]), show(p)
        for mode in ("-y", "-p"):
            p = L.fsck(mode)
            assert p.returncode == 8, show(p)
            assert split_output(p.stdout)[1] == ABORT, show(p)
            assert "fsck.overlay:[Error]: " in p.stderr and "mounted on" in p.stderr


# --------------------------------------------------------------------------- usage (§2.2)


USAGE_HEAD = "Usage:"


@pytest.fixture
def dirs(tmp_path):
    L = make_layers(tmp_path / "s", n_lowers=2)
    files(L.lowers[0], {"f": "f\n"})
    return L


@pytest.mark.parametrize("flags", [["-n", "-y"], ["-p", "-n"], ["-y", "-p"], ["-pn"], ["-a", "-y"]])
def test_usage_more_than_one_mode(dirs, flags):
    p = fsck_overlay(*flags, "-o", dirs.o, state_dir=dirs.state)
    assert p.returncode == 16, show(p)
    assert "Only one of the options -p/-a, -n or -y can be specified!" in p.stderr
    assert USAGE_HEAD in p.stderr


def test_usage_layers(dirs):
    L = dirs
    up, wk = L.upper, L.work
    lo = L.lowers[0]
    cases = [
        ([], "Please specify correct lowerdirs and upperdir!"),
        (["-o", f"upperdir={up},workdir={wk}"], "Please specify correct lowerdirs and upperdir!"),
        (["-o", f"lowerdir={lo}"], "Please specify correct lowerdirs and upperdir!"),
        (["-o", f"lowerdir={lo},upperdir={up}"], "Please specify correct workdir!"),
    ]
    for i, (args, msg) in enumerate(cases):
        for mode in (("-n", "-y") if i == 0 else ("-p",) if i % 2 else ("-y",)):
            p = fsck_overlay(mode, *args, state_dir=L.state)
            assert p.returncode == 16, show(p)
            assert msg in p.stderr and USAGE_HEAD in p.stderr, show(p)


def test_help_and_version(dirs):
    for flag in ("-h", "--help"):
        p = fsck_overlay(flag, state_dir=dirs.state)
        assert p.returncode == 16, show(p)
        assert USAGE_HEAD in p.stdout + p.stderr
        assert "-p," in p.stdout + p.stderr and "-o," in p.stdout + p.stderr
    for flag in ("-V", "--version"):
        p = fsck_overlay(flag, state_dir=dirs.state)
        assert p.returncode == 0, show(p)
        assert "version" in p.stdout


@pytest.mark.parametrize("which", ["upper", "work", "lower0", "lower1"])
def test_missing_layer_exit_8(dirs, which):
    """§2.2: a layer that does not resolve gives exit 8. The old wording (`Faile to resolve
    upperdir:<path>:<strerror>`, misspelt) is not kept: one sentence naming the layer."""
    L = dirs
    missing = L.base / "nonexistent"
    lowers = [missing if which == f"lower{i}" else p for i, p in enumerate(L.lowers)]
    up = missing if which == "upper" else L.upper
    wk = missing if which == "work" else L.work
    o = kutil.overlay_options(lowers, up, wk)
    before = L.snapshot()
    for mode in ("-n", "-y"):
        p = fsck_overlay(mode, "-o", o, state_dir=L.state)
        assert p.returncode == 8, show(p)
        errors = [line for line in p.stderr.splitlines() if line.strip()]
        assert len(errors) == 1 and errors[0].startswith("fsck.overlay:[Error]: "), show(p)
        assert str(missing) in errors[0], show(p)
    assert L.snapshot() == before  # nothing was changed or created
    assert not missing.exists()


def test_three_o_options_as_xfstests(tmp_path):
    """xfstests: `fsck.overlay -o lowerdir=L -o upperdir=U -o workdir=W <mode>`; unknown
    and feature keys are accepted; later values of a key win."""
    L = build_orphans(tmp_path / "s")
    lows = ":".join(map(str, L.lowers))
    base = ["-o", f"lowerdir={lows}", "-o", f"upperdir={L.upper}", "-o", f"workdir={L.work}"]
    p = fsck_overlay("-n", *base, state_dir=L.state)
    assert p.returncode == 4 and len(split_output(p.stdout)[0]) == 5, show(p)
    p = fsck_overlay("-n", "-o", f"lowerdir={tmp_path}/nonexistent", *base,
                     "-o", "index=on,xino=on,redirect_dir=off,metacopy=on,foo=bar",
                     state_dir=L.state)
    assert p.returncode == 4 and len(split_output(p.stdout)[0]) == 5, show(p)
    p = fsck_overlay(*base, "-y", state_dir=L.state)
    assert p.returncode == 1, show(p)
    assert split_output(p.stdout)[1] == [MODIFIED, CLEAN]
    after_orphans(L, "-y")
    p = fsck_overlay(*base, "-n", state_dir=L.state)
    assert p.returncode == 0 and p.stdout == CLEAN + "\n", show(p)
