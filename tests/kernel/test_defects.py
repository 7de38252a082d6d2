"""One test per defect D1-D10 of the old fsck.overlay (prior-art §2.8), proving ovlfsck does
not have it. Layers are made by the real kernel and damaged offline, as in
test_fsck_compat.py (whose helpers are reused); each test asserts concrete exit codes,
report contents and disk state, so it fails if the guarded behaviour breaks.
"""
from __future__ import annotations

import json
import os
import subprocess
from contextlib import contextmanager
from pathlib import Path

import pytest

from . import kutil
from .test_fsck_compat import (
    CLEAN,
    Layers,
    delx,
    dino_mismatches,
    files,
    fsck_overlay,
    getx,
    is_whiteout,
    kernel_session,
    make_layers,
    ovlfsck,
    setx,
    show,
    split_output,
    whiteout,
)

kernel = pytest.mark.kernel
needs_kernel = pytest.mark.skipif(kutil.can_use_kernel() is not None,
                                  reason=f"kernel tests need: {kutil.can_use_kernel()}")


def check(L: Layers, mode: str, *extra: str) -> tuple[int, dict]:
    """`ovlfsck check <mode> --json -o ...` -> (exit code, report)."""
    p = ovlfsck("check", mode, "--json", "-o", L.o, *extra, state_dir=L.state)
    try:
        report = json.loads(p.stdout)
    except ValueError:
        raise AssertionError(f"not one JSON document:\n{show(p)}") from None
    assert report["exit_code"] == p.returncode, show(p)
    report["_stderr"] = p.stderr
    return p.returncode, report


def found(report: dict) -> set[tuple[str, str, str, bool]]:
    """{(code, layer, path, fixed)} of the report's problems."""
    return {(q["code"], q["layer"], q["path"], q["fixed"]) for q in report["problems"]}


@contextmanager
def mounted(args: list[str], target: Path, cwd: Path | None = None):
    """`mount *args target` for the duration of the block; always unmounted."""
    target.mkdir(parents=True, exist_ok=True)
    p = subprocess.run(["mount", *args, str(target)], capture_output=True, text=True, cwd=cwd)
    if p.returncode != 0:
        raise RuntimeError(f"mount {' '.join(args)} {target}: {p.stderr.strip()}")
    try:
        yield target
    finally:
        kutil.umount(target)


@contextmanager
def ro_bind(source: Path, target: Path):
    """`mount --bind source target; mount -o remount,bind,ro target`."""
    with mounted(["--bind", str(source)], target):
        subprocess.run(["mount", "-o", "remount,bind,ro", str(target)], check=True,
                       capture_output=True)
        yield target


# --------------------------------------------------------------------------- D1


@kernel
@needs_kernel
def test_d1_read_only_lower_does_not_stop_the_upper_check(tmp_path):
    """D1: a read-only lower wiped FL_UPPER, so the upper was never checked (exit 4, upper
    orphan left). ovlfsck checks and fixes the upper and never writes the ro lower."""
    for tool in ("ovlfsck", "fsck.overlay"):
        base = tmp_path / tool
        L = make_layers(base)
        files(L.lowers[0], {"f": "f\n", "d": {"g": "g\n"}})
        with kernel_session(L) as m:
            os.unlink(m / "f")
        whiteout(L.upper / "nosuch")
        real_lower = L.lowers[0]
        before = kutil.layer_snapshot(real_lower)
        with ro_bind(real_lower, base / "l0-ro") as ro:
            L.lowers = [ro]
            if tool == "ovlfsck":
                rc, rep = check(L, "-n")
                assert rc == 4 and found(rep) == {("OVL101", "upper", "nosuch", False)}
                p = ovlfsck("check", "-y", "-o", L.o, state_dir=L.state)
                assert p.returncode == 1, show(p)
                assert "lower:0 is read-only: checked, never written" in p.stderr, show(p)
            else:
                p = L.fsck("-y", "-v")
                assert p.returncode == 1, show(p)
                problems, closing = split_output(p.stdout)
                assert 'Orphan whiteout: "nosuch" in upperdir Remove? y' in problems, show(p)
                assert closing == ["File system was modified!", CLEAN], show(p)
            assert not os.path.lexists(L.upper / "nosuch")
            assert is_whiteout(L.upper / "f")
            assert kutil.layer_snapshot(real_lower) == before, "the read-only lower was written"
            p = fsck_overlay("-n", "-o", L.o, state_dir=L.state)
            assert p.returncode == 0, show(p)


@kernel
@needs_kernel
def test_d1_problem_in_the_read_only_lower_is_reported_and_left(tmp_path):
    L = make_layers(tmp_path / "s", n_lowers=2)
    files(L.lowers[1], {"f": "f\n"})
    with kernel_session(L) as m:
        (m / "new").write_text("n\n")
    whiteout(L.upper / "nosuch")
    whiteout(L.lowers[0] / "lorphan")  # orphan in the (read-only) top lower
    real = L.lowers[0]
    before = kutil.layer_snapshot(real)
    with ro_bind(real, tmp_path / "l0-ro") as ro:
        L.lowers = [ro, L.lowers[1]]
        # The front end implies --repair-lowers, but a read-only layer is never written.
        p = L.fsck("-y")
        problems, closing = split_output(p.stdout)
        assert sorted(problems) == [
            'Orphan whiteout: "lorphan" in lowerdir-0 Remove? n',
            'Orphan whiteout: "nosuch" in upperdir Remove? y',
        ], show(p)
        assert p.returncode == 4, show(p)  # fsck_exit(): what is left clears the 1
        assert closing == ["File system was modified!", "Still have unexpected inconsistency!"]
        assert not os.path.lexists(L.upper / "nosuch")
        assert kutil.layer_snapshot(real) == before


# --------------------------------------------------------------------------- D2


@pytest.mark.parametrize("tool", ["ovlfsck", "fsck.overlay"])
def test_d2_bad_non_first_lowerdir(tmp_path, tool):
    """D2: a non-first lowerdir that is not a directory segfaulted (exit 139). Now: exit 8,
    one clear sentence naming every bad layer, no traceback."""
    base = tmp_path / "s"
    for d in ("l0", "upper", "work"):
        (base / d).mkdir(parents=True)
    (base / "l1").write_text("a file, not a directory\n")
    missing = base / "l2"
    cases = {
        "not-a-dir": [base / "l0", base / "l1"],
        "missing": [base / "l0", missing],
        "both": [base / "l0", base / "l1", missing],
    }
    for name, lowers in cases.items():
        o = kutil.overlay_options(lowers, base / "upper", base / "work")
        for mode in (["-n", "-y"] if name == "both" else ["-y"]):
            if tool == "ovlfsck":
                p = ovlfsck("check", mode, "-o", o, state_dir=base / "state")
            else:
                p = fsck_overlay(mode, "-o", o, state_dir=base / "state")
            assert p.returncode == 8, f"{name}: {show(p)}"
            lines = [line for line in p.stderr.splitlines() if line.strip()]
            assert len(lines) == 1, f"{name}: {show(p)}"
            if base / "l1" in lowers:
                assert f"lower:1 {base / 'l1'}: not a directory" in lines[0], show(p)
            if missing in lowers:
                i = lowers.index(missing)
                assert f"lower:{i} {missing}: no such directory" in lines[0], show(p)
            if tool == "fsck.overlay":
                assert lines[0].startswith("fsck.overlay:[Error]: ")
    assert sorted(os.listdir(base)) == ["l0", "l1", "state", "upper", "work"]
    assert not os.listdir(base / "upper") and not os.listdir(base / "work")


# --------------------------------------------------------------------------- D3


ESCAPES = {
    "e1": b"/../target",
    "e2": b"/../../target",
    "e3": b"/sub/../../target",
    "e4": b"..",
    "e5": b"/./sub",
    "e6": b"/..",
}


def build_d3(base: Path) -> Layers:
    """Lower at base/lower-side/l0, upper at base/upper-side/upper: `l0/../target` exists
    (so a resolver that follows `..` finds a directory there), `upper/../target` does not
    (so it would mknod a whiteout there, as the old tool did)."""
    (base / "lower-side").mkdir(parents=True)
    (base / "upper-side").mkdir()
    L = Layers(base, [base / "lower-side" / "l0"], base / "upper-side" / "upper",
               base / "upper-side" / "work")
    for p in (*L.lowers, L.upper, L.work):
        p.mkdir()
    files(L.lowers[0], {"sub": {"s": "s\n"}, "f": "f\n"})
    files(base / "lower-side" / "target", {"t": "outside the layer\n"})
    files(base / "target", {"t": "outside the layer\n"})
    with kernel_session(L) as m:
        for name in ESCAPES:
            (m / name).mkdir()
        with open(m / "f", "a") as f:  # a copy-up: the kernel marks the upper root impure
            f.write("more\n")
    assert getx(L.upper, "impure") == b"y"
    for name, value in ESCAPES.items():
        if getx(L.upper / name, "opaque") is not None:
            delx(L.upper / name, "opaque")  # an opaque dir's redirect is never read
        setx(L.upper / name, "redirect", value)
    return L


def outside(base: Path, L: Layers) -> dict:
    """Snapshot of everything under base except the upper and work layers' contents."""
    snap = kutil.layer_snapshot(base)
    keep = {}
    for k, v in snap.items():
        if k.startswith("upper-side/upper/") or k.startswith("upper-side/work/") \
                or k.startswith("state"):
            continue
        if k in (".", "upper-side/upper", "upper-side/work"):
            # their contents change (the journal dir, our state dir): drop nlink and times
            v = v[:6] + v[7:8] + v[10:]
        keep[k] = v
    return keep


@kernel
@needs_kernel
@pytest.mark.parametrize("tool", ["ovlfsck", "fsck.overlay"])
def test_d3_redirect_escaping_the_layer(tmp_path, tool):
    """D3: `/../target` made the old tool mknod a whiteout at <upper>/../target. ovlfsck
    reports every `.`/`..` redirect, removes it, and creates nothing anywhere."""
    base = tmp_path / "s"
    L = build_d3(base)
    before_out = outside(base, L)
    before_upper = set(kutil.layer_snapshot(L.upper))
    if tool == "ovlfsck":
        rc, rep = check(L, "-n")
        assert rc == 4
        assert found(rep) == {("OVL302", "upper", n, False) for n in ESCAPES}, \
            kutil.format_report(rep)
        rc, rep = check(L, "-y")
        assert rc == 1, kutil.format_report(rep)
        assert found(rep) == {("OVL302", "upper", n, True) for n in ESCAPES}
    else:
        p = L.fsck("-y")
        assert p.returncode == 1, show(p)
        assert sorted(split_output(p.stdout)[0]) == sorted(
            f'Invalid redirect directory: "{n}" in upperdir Remove redirect? y' for n in ESCAPES)
    assert outside(base, L) == before_out, "something outside the layers was touched"
    assert not (base / "upper-side" / "target").exists()
    assert set(kutil.layer_snapshot(L.upper)) == before_upper, "entries created in the upper"
    for name in ESCAPES:
        assert getx(L.upper / name, "redirect") is None
    p = fsck_overlay("-n", "-o", L.o, state_dir=L.state)
    assert p.returncode == 0 and p.stdout == CLEAN + "\n", show(p)
    view = L.view()
    assert view == L.pristine, kutil.diff_views(L.pristine, view)


# --------------------------------------------------------------------------- D4


def build_sample(base: Path, forged: str, forged_first: bool) -> Layers:
    """§3.1: kernel-made (index=on, redirect_dir=on) sample with the damage relevant to D4:
    a forged `<forged>` with redirect=/b, the covering whiteout `b` deleted, plus the other
    sample damage."""
    L = make_layers(base, mount_opts="index=on,redirect_dir=on")
    files(L.lowers[0], {"a": {"f1": "f1\n", "f2": "f2\n"},
                        "b": {"g": "g\n", "bsub": {"y": "y\n"}},
                        "c": "c\n", "d": {"sub": {"x": "x\n"}}, "e": {"e1": "e1\n"},
                        "h1": "h\n"})
    os.link(L.lowers[0] / "h1", L.lowers[0] / "h2")
    os.symlink("a", L.lowers[0] / "sym")
    if forged_first:
        (L.upper / forged).mkdir()  # exists in the upper before the kernel's b2
    with kernel_session(L) as m:
        with open(m / "a" / "f1", "a") as f:
            f.write("more\n")
        os.unlink(m / "a" / "f2")
        os.rename(m / "b", m / "b2")
        subprocess.run(["rm", "-rf", str(m / "d")], check=True)
        (m / "d").mkdir()
        with open(m / "h1", "a") as f:
            f.write("more\n")
        os.utime(m / "e")
        os.unlink(m / "c")
    assert getx(L.upper / "b2", "redirect") == b"b" and getx(L.upper / "b2", "origin")
    if not forged_first:
        (L.upper / forged).mkdir()
    setx(L.upper / forged, "redirect", b"/b")
    os.unlink(L.upper / "b")
    whiteout(L.upper / "nosuch")
    whiteout(L.upper / "d" / "zzz")
    (L.upper / "r1").mkdir()
    setx(L.upper / "r1", "redirect", b"/nonexistent")
    delx(L.upper / "a", "impure")
    whiteout(L.work / "index" / "deadbeef")
    return L


@kernel
@needs_kernel
@pytest.mark.parametrize("fstype", ["ext4", "tmpfs"])
@pytest.mark.parametrize("forged,forged_first", [("b3", True), ("b3", False), ("a_b3", False),
                                                 ("a_b3", True)])
def test_d4_duplicate_redirect_keeps_the_kernel_made_one(make_fs, forged, forged_first, fstype):
    """D4: the old tool kept whichever duplicate readdir met first; in the sample `-y`
    deleted the kernel's b2 -> b and kept the forged b3 -> /b. ovlfsck keeps the redirect
    whose origin handle matches lower b (b2), whatever the names and the readdir order.
    On tmpfs readdir order follows creation order, so both orders are really exercised."""
    fs = make_fs(fstype)
    L = build_sample(fs.mnt / "s", forged, forged_first)
    order = [n for n in os.listdir(L.upper) if n in (forged, "b2")]
    print(f"readdir order in the upper on {fstype}: {order}")
    p = L.fsck("-y")
    assert p.returncode == 1, show(p)
    problems = split_output(p.stdout)[0]
    assert f'Duplicate redirect directory: "{forged}" in upperdir Remove redirect? y' in problems
    assert not any('"b2"' in line for line in problems), show(p)
    assert getx(L.upper / "b2", "redirect") == b"b"
    assert getx(L.upper / forged, "redirect") is None
    assert is_whiteout(L.upper / "b")
    p = L.fsck("-n")
    assert p.returncode == 0, show(p)
    view = L.view()  # index=on: also proves the index dir is mountable (D9)
    for k in ("b2/g", "b2/bsub", "b2/bsub/y"):
        assert view[k] == L.pristine[k], kutil.diff_views(L.pristine, view)
    assert view[forged][0] == "d" and not any(k.startswith(forged + "/") for k in view)
    assert "b" not in view


@kernel
@needs_kernel
def test_d4_preen_also_keeps_the_kernel_made_one(make_fs):
    """With origin evidence the choice is safe, so -p makes it too (exit 1; the old tool's
    -p left it, exit 4)."""
    fs = make_fs("ext4")
    L = build_sample(fs.mnt / "s", "a_b3", False)
    rc, rep = check(L, "-p")
    assert rc == 1, kutil.format_report(rep)
    assert ("OVL307", "upper", "a_b3", True) in found(rep)
    assert ("OVL306", "upper", "b", True) in found(rep)
    assert getx(L.upper / "b2", "redirect") == b"b"
    assert getx(L.upper / "a_b3", "redirect") is None


# --------------------------------------------------------------------------- D5


def build_d5_missing_whiteout(base: Path) -> Layers:
    L = make_layers(base, mount_opts="redirect_dir=on")
    files(L.lowers[0], {"b": {"g": "g\n"}})
    with kernel_session(L) as m:
        os.rename(m / "b", m / "b2")
    os.unlink(L.upper / "b")
    return L


def build_d5_merged_only_impure(base: Path) -> Layers:
    """An upper dir whose only reason to be impure is a merged subdir (no origin, no
    redirect child): the old tool printed it but did not count it."""
    L = make_layers(base)
    files(L.lowers[0], {"p": {"q": {"x": "x\n"}}})
    with kernel_session(L) as m:
        (m / "p" / "q" / "new").write_text("new\n")
    assert getx(L.upper / "p", "impure") == b"y"
    delx(L.upper / "p", "impure")
    delx(L.upper / "p" / "q", "origin")
    return L


@kernel
@needs_kernel
@pytest.mark.parametrize("build,line,fixed_path", [
    (build_d5_missing_whiteout, 'Missing whiteout: "b" in upperdir Add? {}', "b"),
    (build_d5_merged_only_impure, 'Missing impure xattr: "p" in upperdir Fix? {}', "p"),
], ids=["missing-whiteout", "impure-merged-subdir-only"])
def test_d5_n_exit_code_matches_what_y_changes(tmp_path, build, line, fixed_path):
    """D5: `-n` printed these and exited 0 "Filesystem clean" although -p/-y change them.
    Whatever -y fixes, -n reports, and exits 4."""
    L = build(tmp_path / "n")
    p = L.fsck("-n")
    assert p.returncode == 4, show(p)
    assert split_output(p.stdout) == ([line.format("n")], ["Still have unexpected inconsistency!"])
    rc_n, rep_n = check(L, "-n")
    assert rc_n == 4
    for mode in ("-p", "-y"):
        L = build(tmp_path / mode.strip("-"))
        rc, rep = check(L, mode)
        assert rc == 1, kutil.format_report(rep)
        fixed = {(c, lay, path) for c, lay, path, f in found(rep) if f}
        reported = {(c, lay, path) for c, lay, path, f in found(rep_n)}
        assert fixed and fixed <= reported, (fixed, reported)
        assert any(path == fixed_path for _c, _l, path in fixed)
        assert check(L, "-n")[0] == 0


# --------------------------------------------------------------------------- D6


@kernel
@needs_kernel
def test_d6_symlink_only_copied_up_child_needs_impure(tmp_path):
    """D6: only regular files and dirs were examined for origin, so a dir whose only
    copied-up child is a symlink was never flagged. The kernel shows why it matters:
    without impure, readdir's d_ino of the symlink differs from its st_ino."""
    L = make_layers(tmp_path / "s")
    files(L.lowers[0], {"sd": {}})
    os.symlink("target", L.lowers[0] / "sd" / "link")
    with kernel_session(L) as m:
        os.chown(m / "sd" / "link", 1234, -1, follow_symlinks=False)  # chown -h: copy-up
    assert getx(L.upper / "sd" / "link", "origin"), "the kernel gave the symlink an origin"
    assert getx(L.upper / "sd", "impure") == b"y"
    assert os.listdir(L.upper / "sd") == ["link"]
    delx(L.upper / "sd", "impure")
    with L.mounted() as m:
        assert dino_mismatches(m) == ["sd/link"], "damage not visible to the kernel"
    rc, rep = check(L, "-n")
    assert rc == 4 and found(rep) == {("OVL401", "upper", "sd", False)}, kutil.format_report(rep)
    p = L.fsck("-n")
    assert p.returncode == 4
    assert split_output(p.stdout)[0] == ['Missing impure xattr: "sd" in upperdir Fix? n'], show(p)
    p = L.fsck("-y")
    assert p.returncode == 1, show(p)
    assert getx(L.upper / "sd", "impure") == b"y"
    with L.mounted() as m:
        assert dino_mismatches(m) == []
        assert kutil.merged_view(m) == L.pristine


# --------------------------------------------------------------------------- D7


@kernel
@needs_kernel
def test_d7_sibling_names_are_not_nesting(tmp_path):
    """D7: upper=…/x/upper with work=…/x/up was refused by a substring test."""
    x = tmp_path / "x"
    (x / "l").mkdir(parents=True)
    (x / "upper").mkdir()
    (x / "up").mkdir()
    L = Layers(x, [x / "l"], x / "upper", x / "up")
    files(L.lowers[0], {"f": "f\n"})
    with kernel_session(L) as m:  # the kernel accepts it
        (m / "g").write_text("g\n")
    whiteout(L.upper / "nosuch")
    p = L.fsck("-y")
    assert p.returncode == 1, show(p)
    assert split_output(p.stdout) == (['Orphan whiteout: "nosuch" in upperdir Remove? y'],
                                      ["File system was modified!", CLEAN])
    assert not os.path.lexists(L.upper / "nosuch")
    rc, rep = check(L, "-n")
    assert rc == 0, kutil.format_report(rep)


@kernel
@needs_kernel
@pytest.mark.parametrize("nesting", ["work-in-upper", "upper-in-work"])
def test_d7_real_nesting_refused_with_the_kernels_words(tmp_path, nesting):
    x = tmp_path / "x"
    (x / "l").mkdir(parents=True)
    if nesting == "work-in-upper":
        up, wk = x / "upper", x / "upper" / "work"
    else:
        up, wk = x / "work" / "upper", x / "work"
    wk.mkdir(parents=True, exist_ok=True)
    up.mkdir(parents=True, exist_ok=True)
    L = Layers(x, [x / "l"], up, wk)
    with pytest.raises(kutil.OverlayMountError) as exc:
        with L.mounted():
            pass
    kernel_words = "workdir and upperdir must be separate subtrees"
    if exc.value.dmesg:
        assert any(kernel_words in line for line in exc.value.dmesg), exc.value.dmesg
    before = L.snapshot()
    for mode in ("-n", "-y"):
        p = L.fsck(mode)
        assert p.returncode == 8, show(p)
        errors = [line for line in p.stderr.splitlines() if line.strip()]
        assert len(errors) == 1 and kernel_words in errors[0], show(p)
        p = ovlfsck("check", mode, "-o", L.o, state_dir=L.state)
        assert p.returncode == 8 and kernel_words in p.stderr, show(p)
    assert L.snapshot() == before


# --------------------------------------------------------------------------- D8


@kernel
@needs_kernel
def test_d8_relative_path_mount_is_detected(tmp_path):
    """D8: an overlay mounted with relative paths was not detected; -y ran on it."""
    L = make_layers(tmp_path / "s")
    files(L.lowers[0], {"f": "f\n"})
    whiteout(L.upper / "nosuch")
    mnt = tmp_path / "elsewhere" / "m"
    with mounted(["-t", "overlay", "overlay", "-o", "lowerdir=l0,upperdir=upper,workdir=work"],
                 mnt, cwd=L.base):
        shown = kutil.mount_info(mnt)
        assert shown is not None and "upperdir=upper" in shown, shown
        for mode in ("-y", "-p"):
            p = L.fsck(mode)
            assert p.returncode == 8, show(p)
            assert str(mnt) in p.stderr, show(p)
            p = ovlfsck("check", mode, "-o", L.o, state_dir=L.state)
            assert p.returncode == 8 and str(mnt) in p.stderr, show(p)
        assert os.path.lexists(L.upper / "nosuch"), "repaired a mounted overlay"
        p = L.fsck("-n")  # checking while mounted is allowed
        assert p.returncode == 4, show(p)
    p = L.fsck("-y")
    assert p.returncode == 1, show(p)


@kernel
@needs_kernel
def test_d8_unrelated_overlay_sharing_a_lower_is_named(tmp_path):
    """The old tool's "WARNING: Dir … is mounted" did not say which layer or why. ovlfsck
    refuses a repair naming the shared layer and the mount, and -n checks with a note."""
    L = make_layers(tmp_path / "s")
    files(L.lowers[0], {"f": "f\n"})
    whiteout(L.upper / "nosuch")
    other = make_layers(tmp_path / "other")
    mnt = tmp_path / "other-mnt"
    with kutil.mount_overlay([L.lowers[0]], other.upper, other.work, mnt):
        p = ovlfsck("check", "-y", "-o", L.o, state_dir=L.state)
        assert p.returncode == 8, show(p)
        assert f"lower:0 {L.lowers[0]} (its lowerdir) is used by the overlay mounted on {mnt}" \
            in p.stderr, show(p)
        assert f"upper {L.upper}" not in p.stderr
        assert os.path.lexists(L.upper / "nosuch")
        p = ovlfsck("check", "-n", "-o", L.o, state_dir=L.state)
        assert p.returncode == 4 and str(mnt) in p.stderr, show(p)
        assert "nosuch" in p.stdout, show(p)
    rc, rep = check(L, "-y")
    assert rc == 1


# --------------------------------------------------------------------------- D9


@kernel
@needs_kernel
def test_d9_clean_means_mountable_index_junk(tmp_path):
    """D9: junk in work/index was not checked; the old tool said clean and the kernel then
    refused the mount (`failed to verify index (index/deadbeef…)`)."""
    L = make_layers(tmp_path / "s", mount_opts="index=on")
    files(L.lowers[0], {"h1": "h\n", "d": {"a": "a\n"}})
    os.link(L.lowers[0] / "h1", L.lowers[0] / "h2")
    with kernel_session(L) as m:
        with open(m / "h1", "a") as f:  # a hard-linked copy-up: a real index entry
            f.write("more\n")
        with open(m / "d" / "a", "a") as f:
            f.write("more\n")
    entries = os.listdir(L.work / "index")
    assert any(len(n) > 42 for n in entries), entries
    whiteout(L.work / "index" / "deadbeef")
    with pytest.raises(kutil.OverlayMountError) as exc:  # what the kernel says about it
        with L.mounted():
            pass
    if exc.value.dmesg:
        assert any("failed to verify index (index/deadbeef" in line for line in exc.value.dmesg)
    rc, rep = check(L, "-n")
    assert rc == 4, kutil.format_report(rep)
    assert found(rep) == {("OVL601", "work", "index/deadbeef", False)}
    p = L.fsck("-n")
    assert p.returncode == 4, show(p)
    assert len(split_output(p.stdout)[0]) == 1 and '"index/deadbeef" in workdir' in p.stdout
    rc, rep = check(L, "-y")
    assert rc == 1, kutil.format_report(rep)
    assert not os.path.lexists(L.work / "index" / "deadbeef")
    assert check(L, "-n")[0] == 0
    view = L.view()  # index=on
    assert view == L.pristine, kutil.diff_views(L.pristine, view)


# --------------------------------------------------------------------------- D10


@kernel
@needs_kernel
def test_d10_missing_whiteout_named_where_it_goes(tmp_path):
    """D10: "Missing whiteout: <redirect dir>" although the whiteout goes to the origin."""
    L = make_layers(tmp_path / "s", mount_opts="redirect_dir=on")
    files(L.lowers[0], {"old": {"dir": {"z": "z\n"}, "keep": "k\n"}})
    with kernel_session(L) as m:
        os.rename(m / "old" / "dir", m / "new")
    assert getx(L.upper / "new", "redirect") == b"/old/dir"
    assert is_whiteout(L.upper / "old" / "dir")
    os.unlink(L.upper / "old" / "dir")
    rc, rep = check(L, "-n")
    assert rc == 4
    assert found(rep) == {("OVL306", "upper", "old/dir", False)}, kutil.format_report(rep)
    (q,) = rep["problems"]
    assert "'old/dir'" in q["action"], q
    p = L.fsck("-n")
    assert split_output(p.stdout)[0] == ['Missing whiteout: "old/dir" in upperdir Add? n']
    rc, rep = check(L, "-y")
    assert rc == 1 and found(rep) == {("OVL306", "upper", "old/dir", True)}
    assert is_whiteout(L.upper / "old" / "dir")
    assert sorted(os.listdir(L.upper)) == ["new", "old"]  # nothing at the redirect dir
    view = L.view()
    assert view == L.pristine, kutil.diff_views(L.pristine, view)


@kernel
@needs_kernel
@pytest.mark.parametrize("mode", ["-p", "-y"])
def test_d10_lower_layers_not_modified_without_repair_lowers(tmp_path, mode):
    """D10: `-p` silently modified lower layers. `ovlfsck check` reports lower problems and
    leaves them unless --repair-lowers is given."""
    L = make_layers(tmp_path / "s", n_lowers=2)
    files(L.lowers[1], {"f": "f\n", "d": {"x": "x\n"}})
    files(L.lowers[0], {"m": {}})
    with kernel_session(L) as mnt:
        (mnt / "new").write_text("n\n")
    whiteout(L.lowers[0] / "lorphan")
    whiteout(L.lowers[1] / "d" / "bottom")
    setx(L.lowers[0] / "m", "redirect", b"/nowhere")
    before = {k: v for k, v in L.snapshot().items() if k.startswith("lower")}
    rc, rep = check(L, mode)
    assert rc == 4, kutil.format_report(rep)
    assert found(rep) == {
        ("OVL101", "lower:0", "lorphan", False),
        ("OVL101", "lower:1", "d/bottom", False),
        ("OVL303", "lower:0", "m", False),
    }, kutil.format_report(rep)
    assert all("--repair-lowers" in q.get("note", "") for q in rep["problems"])
    assert {k: v for k, v in L.snapshot().items() if k.startswith("lower")} == before
    assert rep["journal"] is None
    # With --repair-lowers they are repaired.
    rc, rep = check(L, mode, "--repair-lowers")
    assert rc == 1, kutil.format_report(rep)
    assert not os.path.lexists(L.lowers[0] / "lorphan")
    assert getx(L.lowers[0] / "m", "redirect") is None
    assert check(L, "-n")[0] == 0
