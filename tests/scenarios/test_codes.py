"""One real-kernel scenario per fixable problem code.

For every code of the catalog that has a fix, a scenario

1. builds a layer set with the real kernel (loop ext4, the options the code needs; files
   created, renamed and deleted through the mount), unmounts, and records the merged view of
   a fresh mount (the *expected* view);
2. damages the layers offline (setfattr / mknod / rm / mkdir on the layer directories) and
   takes a raw snapshot of every layer (upper, work, lowers);

and then checks

(a) ``check -n --json`` exits 4, reports the code at the expected layer and path, and
    changes nothing (ctimes included);
(b) ``check -y --json`` exits 1, reports it fixed, and names an existing journal (for a
    problem in a lower layer: only with ``--repair-lowers``; without it -y exits 4 and
    changes nothing);
(c) ``check -n`` exits 0;
(e1) ``ovlfsck undo <journal>`` exits 0 and restores every layer exactly as damaged
    (types, modes, owners, inode numbers, link counts, rdev, content, every xattr;
    `<work>/ovlfsck` left out);
then repairs again (``check -y`` exits 1, ``check -n`` 0), and
(d) mounts with the same options: the mount succeeds, the kernel logs nothing the damage
    would cause, and the merged view equals the expected one (or, where the fix
    intentionally changes what is visible, the documented result);
(e2) after unmounting, ``ovlfsck undo`` of that second journal exits 0 and brings the damage
    back: every layer equals the damaged snapshot except for what the kernel itself rewrites
    at every read-write mount (the inode of work/work and its contents, the `#N`
    temporaries of the index, the link count of the shared whiteout inode).

Codes with default severity warning/info are run with ``--severity CODE=error``.
OVL311 is a follow-up choice (never counted, never shown under -n): its scenario expects
the redirect problem it follows under -n and OVL311 among the fixes of -y.
OVL901 has no fix: it is produced with a corrupted ext4 directory block and must be reported
with exit 12 (4|8) by -n and -y alike, changing nothing.
"""
from __future__ import annotations

import json
import os
import re
import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

import pytest

from ovlfsck.problems import BY_CODE, CATALOG, Severity

from .helpers import (
    Bed,
    diff_snapshots,
    getx,
    kutil,
    mkdir,
    mkwhiteout,
    mkxwhiteout,
    rmx,
    setx,
    write,
)

FIXABLE = [p.code for p in CATALOG if p.prompt is not None]
DIR_0755 = ("d", 0o755, 0, 0, 0, None, None)  # merged_view entry of a fresh empty root-owned dir

# Every scenario uses names containing "zq", so kernel log lines about them can be told
# from those of other overlays mounted concurrently on this machine.
TOKEN = "zq"


@dataclass
class Scenario:
    code: str
    build: Callable[[Bed], None]  # lower layers offline, then operations through a mount
    damage: Callable[[Bed], None]  # offline, on the layer directories
    layer: str  # where (a) must report the code
    path: str
    options: str = ""
    nlowers: int = 1
    fix_args: tuple[str, ...] = ()  # e.g. --repair-lowers
    expect: Optional[Callable[[dict], dict]] = None  # view transform, when the fix changes it
    kernel_sig: tuple[str, ...] = ()  # regexes of the dmesg lines the damage makes the kernel log
    reported_as: Optional[str] = None  # the code -n reports (OVL311: the redirect problem)

    @property
    def severity_args(self) -> list[str]:
        codes = {self.code, self.reported_as or self.code}
        return [a for c in sorted(codes) if BY_CODE[c].severity is not Severity.ERROR
                for a in ("--severity", f"{c}=error")]


SCENARIOS: dict[str, Scenario] = {}


def scenario(**kw):
    def register(fn):
        sc = fn()
        for k, v in kw.items():
            setattr(sc, k, v)
        SCENARIOS[sc.code] = sc
        return fn
    return register


def drop_under(prefix: str, keep: tuple[str, ...] = ()) -> Callable[[dict], dict]:
    """A view without the children of `prefix` (except `keep`): a directory that stops merging."""
    def tf(view: dict) -> dict:
        return {k: v for k, v in view.items() if not k.startswith(prefix + "/") or k in keep}
    return tf


def add_dir(path: str) -> Callable[[dict], dict]:
    def tf(view: dict) -> dict:
        return {**view, path: DIR_0755}
    return tf


# =========================================================================== whiteouts


def _ovl101():
    def build(b: Bed):
        write(b.L(0, "d", "a"), "a\n")
        with b.mounted() as m:
            write(m / "d" / "new", "n\n")  # copies d up: a merged directory
    def damage(b: Bed):
        mkwhiteout(b.U("d", "zqghost"))  # hides nothing: no lower d/zqghost
    return Scenario("OVL101", build, damage, "upper", "d/zqghost")


def _ovl102():
    def build(b: Bed):
        write(b.L(0, "d", "a"), "a\n")
        with b.mounted() as m:
            subprocess.run(["rm", "-rf", str(m / "d")], check=True)
            os.mkdir(m / "d")  # mkdir over a whiteout: upper d gets opaque=y
            write(m / "d" / "b", "b\n")
        assert getx(b.U("d"), "opaque") == b"y"
    def damage(b: Bed):
        mkwhiteout(b.U("d", "a"))
    return Scenario("OVL102", build, damage, "upper", "d/a")


def _ovl103():
    def build(b: Bed):
        write(b.L(0, "keep"), "k\n")
        with b.mounted() as m:
            os.mkdir(m / "zqpure")
            write(m / "zqpure" / "x", "x\n")
        assert getx(b.U("zqpure"), "opaque") is None
    def damage(b: Bed):
        mkwhiteout(b.U("zqpure", "zqw"))  # readdir of a pure upper dir lists it (H21)
    return Scenario("OVL103", build, damage, "upper", "zqpure/zqw")


def _ovl104():
    def build(b: Bed):
        write(b.L(0, "zqd", "f"), "lower f\n")
        write(b.L(0, "zqd", "g"), "g\n")
        with b.mounted() as m:
            os.unlink(m / "zqd" / "f")  # the kernel leaves a 0/0 whiteout in upper zqd
    def damage(b: Bed):
        os.unlink(b.U("zqd", "f"))
        mkxwhiteout(b.U("zqd", "f"))  # same meaning for lookup, but readdir lists it (X2)
    return Scenario("OVL104", build, damage, "upper", "zqd/f")


def _ovl105():
    def build(b: Bed):
        # l0 (top lower) was made by a tool that writes xattr whiteouts; l1 beneath.
        write(b.L(1, "zqd", "f"), "bottom f\n")
        write(b.L(1, "zqd", "g"), "g\n")
        mkdir(b.L(0, "zqd"))
        mkxwhiteout(b.L(0, "zqd", "f"))
        setx(b.L(0, "zqd"), "opaque", b"x")
        with b.mounted() as m:
            assert sorted(os.listdir(m / "zqd")) == ["g"]  # the marker makes readdir filter f
            write(m / "new", "n\n")
    def damage(b: Bed):
        rmx(b.L(0, "zqd"), "opaque")  # marker lost: readdir lists f, lookup says ENOENT (X1 e)
    return Scenario("OVL105", build, damage, "lower:0", "zqd", nlowers=2,
                    fix_args=("--repair-lowers",))


# =========================================================================== opaque


def _merged_dir_build(b: Bed):
    write(b.L(0, "zqd", "a"), "a\n")
    with b.mounted() as m:
        write(m / "zqd" / "b", "b\n")  # copies zqd up: merged with the lower zqd


def _ovl201():
    def damage(b: Bed):
        setx(b.U("zqd"), "opaque", b"yes")  # ignored by the kernel (H12a)
    return Scenario("OVL201", _merged_dir_build, damage, "upper", "zqd")


def _ovl202():
    def build(b: Bed):
        write(b.L(0, "keep"), "k\n")
        with b.mounted() as m:
            write(m / "zqf", "f\n")
    def damage(b: Bed):
        setx(b.U("zqf"), "opaque", b"y")
    return Scenario("OVL202", build, damage, "upper", "zqf")


def _ovl203():
    def damage(b: Bed):
        setx(b.U("zqd"), "opaque", b"x")  # no meaning on the upper (H12d)
    return Scenario("OVL203", _merged_dir_build, damage, "upper", "zqd")


# =========================================================================== redirects


def _renamed_dir_build(b: Bed):
    """redirect_dir=on: lower zqd/a renamed to zqdm through the mount, plus an own child."""
    write(b.L(0, "zqd", "a"), "a\n")
    write(b.L(0, "zqfile"), "a file\n")
    with b.mounted() as m:
        os.rename(m / "zqd", m / "zqdm")
        write(m / "zqdm" / "zqown", "own\n")
    assert getx(b.U("zqdm"), "redirect") == b"zqd"


def _bad_redirect(code: str, value: bytes, sig: tuple[str, ...] = ()):
    def damage(b: Bed):
        setx(b.U("zqdm"), "redirect", value)
    # The directory stops merging: what came from the lower zqd is gone, its own child stays.
    return Scenario(code, _renamed_dir_build, damage, "upper", "zqdm", options="redirect_dir=on",
                    expect=drop_under("zqdm", keep=("zqdm/zqown",)), kernel_sig=sig)


def _ovl301():
    return _bad_redirect("OVL301", b"zqa/b", (r"invalid redirect",))


def _ovl302():
    return _bad_redirect("OVL302", b"/zq/../zqd")


def _ovl303():
    return _bad_redirect("OVL303", b"/zqgone")


def _ovl304():
    return _bad_redirect("OVL304", b"/zqfile")


def _ovl305():
    def build(b: Bed):
        write(b.L(0, "zqd", "a"), "a\n")
        with b.mounted() as m:
            os.rename(m / "zqd", m / "zqdm")
            os.rename(m / "zqdm", m / "zqd")  # renamed back: the kernel keeps redirect "zqd"
    def damage(b: Bed):
        # Nothing to damage: the kernel itself left the self redirect.
        assert getx(b.U("zqd"), "redirect") == b"zqd"
    return Scenario("OVL305", build, damage, "upper", "zqd", options="redirect_dir=on")


def _ovl306():
    def build(b: Bed):
        write(b.L(0, "zqp", "zqd", "a"), "a\n")
        write(b.L(0, "zqp", "other"), "o\n")
        with b.mounted() as m:
            os.mkdir(m / "zqq")
            os.rename(m / "zqp" / "zqd", m / "zqq" / "zqdm")  # redirect "/zqp/zqd"
        assert getx(b.U("zqq", "zqdm"), "redirect") == b"/zqp/zqd"
        assert os.stat(b.U("zqp", "zqd")).st_rdev == 0
    def damage(b: Bed):
        # The copy of the upper lost zqp (with the whiteout at the old location in it).
        subprocess.run(["rm", "-rf", str(b.U("zqp"))], check=True)
    return Scenario("OVL306", build, damage, "upper", "zqp/zqd", options="redirect_dir=on",
                    kernel_sig=(r"failed to get inode",))


def _ovl307():
    def build(b: Bed):
        write(b.L(0, "zqd", "a"), "a\n")
        with b.mounted() as m:
            os.rename(m / "zqd", m / "zqdm")
            os.mkdir(m / "zqdx")  # new dir in a merged dir: opaque=y
        assert getx(b.U("zqdx"), "opaque") == b"y"
    def damage(b: Bed):
        # A forged claim on the same lower directory (no origin to back it).
        rmx(b.U("zqdx"), "opaque")
        setx(b.U("zqdx"), "redirect", b"zqd")
    return Scenario("OVL307", build, damage, "upper", "zqdx", options="redirect_dir=on",
                    kernel_sig=(r"failed to get inode",))


def _ovl308():
    def build(b: Bed):
        write(b.L(0, "zqd", "a"), "a\n")
        with b.mounted() as m:
            os.rename(m / "zqd", m / "zqdm")
    def damage(b: Bed):
        # The whiteout at the old location became a plain directory: zqd merges again.
        os.unlink(b.U("zqd"))
        mkdir(b.U("zqd"))
    # The origin of zqdm proves the rename: the plain zqd loses its claim (made opaque).
    return Scenario("OVL308", build, damage, "upper", "zqd", options="redirect_dir=on",
                    expect=add_dir("zqd"), kernel_sig=(r"failed to get inode",))


def _ovl309():
    def build(b: Bed):
        write(b.L(0, "zqd", "a"), "a\n")
        with b.mounted() as m:
            write(m / "zqd" / "b", "b\n")
    def damage(b: Bed):
        setx(b.L(0, "zqd"), "redirect", b"/zqnowhere")  # lowermost: never read
    return Scenario("OVL309", build, damage, "lower:0", "zqd", fix_args=("--repair-lowers",))


def _ovl310():
    def build(b: Bed):
        write(b.L(0, "keep"), "k\n")
        with b.mounted() as m:
            write(m / "zqf", "f\n")
    def damage(b: Bed):
        setx(b.U("zqf"), "redirect", b"/keep")  # ignored: not a metacopy file
    return Scenario("OVL310", build, damage, "upper", "zqf")


def _ovl311():
    def build(b: Bed):
        write(b.L(0, "zqe", "a"), "a\n")
        write(b.L(0, "zqx", "zqhidden"), "h\n")
        with b.mounted() as m:
            subprocess.run(["rm", "-rf", str(m / "zqx")], check=True)
            os.rename(m / "zqe", m / "zqx")  # upper zqx: redirect "zqe"; lower zqx stays hidden
            write(m / "zqx" / "zqown", "own\n")
        assert getx(b.U("zqx"), "redirect") == b"zqe"
        assert getx(b.U("zqx"), "opaque") is None
    def damage(b: Bed):
        setx(b.U("zqx"), "redirect", b"/zqgone")  # dangling
    # Removing the redirect would merge zqx with the lower zqx; -y also makes it opaque, so
    # neither the lower zqe content nor the lower zqx content shows in it.
    return Scenario("OVL311", build, damage, "upper", "zqx", options="redirect_dir=on",
                    expect=drop_under("zqx", keep=("zqx/zqown",)), reported_as="OVL303")


# =========================================================================== impure, index


def _ovl401():
    def build(b: Bed):
        write(b.L(0, "zqd", "a"), "a\n")
        with b.mounted() as m:
            with open(m / "zqd" / "a", "a") as fh:
                fh.write("more\n")  # copy-up of a: origin on a, impure on zqd
        assert getx(b.U("zqd"), "impure") == b"y"
    def damage(b: Bed):
        rmx(b.U("zqd"), "impure")
    return Scenario("OVL401", build, damage, "upper", "zqd")


def _ovl601():
    def build(b: Bed):
        write(b.L(0, "zqf"), "f\n")
        os.link(b.L(0, "zqf"), b.L(0, "zqf2"))
        with b.mounted() as m:
            with open(m / "zqf", "a") as fh:
                fh.write("more\n")  # a lower hardlink: copied up through the index
        assert [n for n in os.listdir(b.W("index")) if not n.startswith("#")]
    def damage(b: Bed):
        write(b.W("index", "zqjunk"), "junk\n")
    return Scenario("OVL601", build, damage, "work", "index/zqjunk", options="index=on",
                    kernel_sig=(r"failed to verify index", r"failed index dir cleanup"))


for _fn in (_ovl101, _ovl102, _ovl103, _ovl104, _ovl105, _ovl201, _ovl202, _ovl203, _ovl301,
            _ovl302, _ovl303, _ovl304, _ovl305, _ovl306, _ovl307, _ovl308, _ovl309, _ovl310,
            _ovl311, _ovl401, _ovl601):
    scenario()(_fn)


# =========================================================================== running


def run(*args: str) -> subprocess.CompletedProcess:
    p = kutil.run_ovlfsck(*args)
    assert "Traceback" not in p.stderr, p.stderr
    return p


def run_json(*args: str) -> tuple[int, dict]:
    p = run(*args)
    try:
        doc = json.loads(p.stdout)
    except ValueError:
        pytest.fail(f"not one JSON document (exit {p.returncode}):\n{p.stdout}\n{p.stderr}")
    assert doc["exit_code"] == p.returncode, kutil.format_report(doc)
    return p.returncode, doc


def found(doc: dict, code: str, layer: str, path: str) -> list[dict]:
    return [p for p in doc["problems"] if (p["code"], p["layer"], p["path"]) == (code, layer, path)]


def relevant_dmesg(lines: list[str], sc: Scenario) -> list[str]:
    """Kernel lines caused by this scenario's damage: its signature, or naming its objects."""
    pats = [re.compile(s) for s in sc.kernel_sig]
    return [ln for ln in lines if TOKEN in ln or any(p.search(ln) for p in pats)]


def mount_artifacts_removed(snap: dict) -> dict:
    """What a read-write mount rewrites by itself (overlay-format.md §5.1, §9.4, §10.2), left
    out: the inode number of work/work and whatever is in it (recreated at every mount), the
    `#N` temporaries of work/index (cleaned at mount), and the link count of whiteouts (the
    kernel's shared whiteout inode is also linked from those temporaries)."""
    out = {}
    for layer, entries in snap.items():
        new = {}
        for rel, rec in entries.items():
            rec = dict(rec)
            if layer == "work":
                if rel.startswith("work/") or rel.startswith("index/#"):
                    continue
                if rel == "work":
                    rec.pop("ino")
            if rec["type"] == "c" and rec["rdev"] == 0:
                rec.pop("nlink", None)
            new[rel] = rec
        out[layer] = new
    return out


def test_every_fixable_code_has_a_scenario():
    """A new fixable code must come with a real-kernel scenario here."""
    missing = [c for c in FIXABLE if c not in SCENARIOS]
    assert not missing, f"fixable problem codes without a kernel scenario: {missing}"
    stale = [c for c in SCENARIOS if c not in BY_CODE or BY_CODE[c].prompt is None]
    assert not stale, f"scenarios for codes that are not fixable catalog codes: {stale}"


@pytest.mark.kernel
@pytest.mark.parametrize("code", FIXABLE)
def test_code_scenario(code, bed):
    sc = SCENARIOS.get(code)
    if sc is None:
        pytest.fail(f"{code} has a fix but no kernel scenario in {__name__}")
    b = bed(nlowers=sc.nlowers, options=sc.options)
    sc.build(b)
    expected = b.view()
    if sc.expect is not None:
        expected = sc.expect(expected)
    sc.damage(b)
    damaged = b.snapshot()
    raw_before = {n: kutil.layer_snapshot(p) for n, p in b.layer_paths.items()}
    stack = b.args()
    sev = sc.severity_args
    reported = sc.reported_as or sc.code

    # (a) -n: exit 4, the code at the expected place, nothing changed (ctimes included).
    rc, doc = run_json("check", "-n", "--json", *stack, *sev)
    hits = found(doc, reported, sc.layer, sc.path)
    assert rc == 4 and hits, f"-n: exit {rc}, expected {reported} at {sc.layer}:{sc.path}\n" \
                             + kutil.format_report(doc)
    assert all(h["fixed"] is False and h["severity"] == "error" for h in hits)
    assert doc["journal"] is None and doc["counts"]["left"] >= 1
    raw_after = {n: kutil.layer_snapshot(p) for n, p in b.layer_paths.items()}
    for name in raw_before:
        assert raw_after[name] == raw_before[name], \
            f"-n changed {name}:\n{kutil.diff_views(raw_before[name], raw_after[name])}"

    if "--repair-lowers" in sc.fix_args:
        # Lower layers are checked always, repaired only with --repair-lowers.
        rc, doc = run_json("check", "-y", "--json", *stack, *sev)
        hits = found(doc, reported, sc.layer, sc.path)
        assert rc == 4 and hits and not any(h["fixed"] for h in hits), kutil.format_report(doc)
        assert doc["journal"] is None
        assert b.snapshot() == damaged

    # (b) -y: exit 1, fixed, journal named and present.
    rc, doc = run_json("check", "-y", "--json", *stack, *sev, *sc.fix_args)
    hits = found(doc, sc.code, sc.layer, sc.path)
    assert rc == 1 and hits and all(h["fixed"] for h in hits), \
        f"-y: exit {rc}\n" + kutil.format_report(doc)
    assert doc["counts"]["left"] == 0 and doc["counts"]["fixed"] >= 1
    journal = doc["journal"]
    assert isinstance(journal, str) and os.path.isfile(journal), journal
    assert Path(journal).parent == b.work / "ovlfsck", journal

    # (c) a second run finds nothing.
    p = run("check", "-n", *stack, *sev)
    assert p.returncode == 0, p.stdout + p.stderr
    repaired = b.snapshot()

    # (e1) undo restores the damaged layers exactly.
    p = run("undo", journal)
    assert p.returncode == 0 and "refused" not in p.stdout, p.stdout + p.stderr
    now = b.snapshot()
    assert now == damaged, "undo did not restore the damaged layers:\n" + diff_snapshots(damaged, now)
    assert found(run_json("check", "-n", "--json", *stack, *sev)[1], reported, sc.layer, sc.path)

    # Repair again for the mount.
    rc, doc = run_json("check", "-y", "--json", *stack, *sev, *sc.fix_args)
    assert rc == 1, kutil.format_report(doc)
    journal2 = doc["journal"]
    assert journal2 and journal2 != journal and os.path.isfile(journal2)
    assert run("check", "-n", *stack, *sev).returncode == 0
    again = b.snapshot()
    created = {(layer, rel) for layer in repaired for rel in repaired[layer]
               if rel not in damaged.get(layer, {})}
    assert {(la, r) for la in again for r in again[la] if r not in damaged.get(la, {})} == created

    # (d) the kernel mounts the repaired layers without complaint and shows the expected view.
    marker = kutil.dmesg_mark()
    with b.mounted() as m:
        view = kutil.merged_view(m)
    lines = kutil.dmesg_overlay_since(marker)
    assert not relevant_dmesg(lines, sc), "kernel complained:\n" + "\n".join(lines)
    assert view == expected, "merged view after repair:\n" + kutil.diff_views(expected, view, names=("expected", "got"))

    # (e2) undo after the kernel mounted the repaired layers brings the damage back.
    p = run("undo", journal2)
    assert p.returncode == 0 and "refused" not in p.stdout, p.stdout + p.stderr
    now = b.snapshot()
    want = mount_artifacts_removed(damaged)
    got = mount_artifacts_removed(now)
    assert got == want, "undo after a mount:\n" + diff_snapshots(want, got)
    assert found(run_json("check", "-n", "--json", *stack, *sev)[1], reported, sc.layer, sc.path)


# =========================================================================== OVL901


def _ext4_dir_block(image: Path, path_in_fs: str) -> int:
    p = subprocess.run(["debugfs", "-R", f"blocks {path_in_fs}", str(image)],
                       capture_output=True, text=True, check=True)
    blocks = p.stdout.split()
    assert blocks, p.stdout + p.stderr
    return int(blocks[0])


def _ext4_block_size(image: Path) -> int:
    p = subprocess.run(["dumpe2fs", "-h", str(image)], capture_output=True, text=True, check=True)
    m = re.search(r"^Block size:\s+(\d+)", p.stdout, re.M)
    assert m, p.stdout
    return int(m.group(1))


@pytest.mark.kernel
def test_ovl901_unreadable_directory_is_reported_and_nothing_changes(bed):
    """A directory whose ext4 block is garbage cannot be listed (EUCLEAN/EBADMSG): OVL901,
    no fix, exit 4|8 (a problem left and an operational error) under -n and -y alike, and
    no layer is changed, not even by -y (nothing else to fix: no journal)."""
    b = bed(options="")
    write(b.L(0, "zqd", "a"), "a\n")
    with b.mounted() as m:
        mkdir(m / "zqbad")
        for i in range(3):
            write(m / "zqbad" / f"f{i}", f"{i}\n")
        write(m / "zqd" / "b", "b\n")
    fs = b.fs
    block = _ext4_dir_block(fs.image, "/zqupper/zqbad")
    bs = _ext4_block_size(fs.image)
    kutil.umount(fs.mnt)
    with open(fs.image, "r+b") as fh:
        fh.seek(block * bs)
        fh.write(b"\xa5" * bs)
    subprocess.run(["mount", "-t", "ext4", "-o", "errors=continue", fs.device, str(fs.mnt)],
                   check=True)
    with pytest.raises(OSError):
        os.listdir(b.U("zqbad"))
    before = b.snapshot()
    assert before["upper"]["zqbad"].get("unreadable"), before["upper"]["zqbad"]
    stack = b.args()
    for mode in ("-n", "-y"):
        rc, doc = run_json("check", mode, "--json", *stack)
        hits = found(doc, "OVL901", "upper", "zqbad")
        assert rc == 12 and hits, f"{mode}: exit {rc}\n" + kutil.format_report(doc)
        assert all(h["fixed"] is False and h["action"] is None for h in hits)
        assert doc["journal"] is None
        assert doc.get("error"), "the operational error must be named in the report"
        assert b.snapshot() == before, f"{mode} changed the layers:\n" + diff_snapshots(before, b.snapshot())
        p = run("check", mode, *stack)
        assert p.returncode == 12 and "zqbad" in p.stdout + p.stderr, p.stdout + p.stderr
