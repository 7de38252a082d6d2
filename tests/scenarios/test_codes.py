"""One real-kernel scenario per fixable problem code.

For every code of the catalog that has a fix, a scenario

1. builds a layer set with the real kernel (loop ext4, the options the code needs; files
   created, renamed and deleted through the mount), unmounts, and records the merged view of
   a fresh mount (the *expected* view);
2. damages the layers offline (setfattr / mknod / rm / mkdir on the layer directories) and
   takes a raw snapshot of every layer (upper, work, lowers);

and then checks

(a) ``check -n --json`` exits 4, reports the code at the expected layer and path, and
    changes nothing (ctimes included); with the read-ahead child started at once
    (OVLFSCK_PREFETCH=1) it reports exactly the same;
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
from pathlib import Path

import pytest

from ovlfsck.problems import BY_CODE

from . import defs_core, defs_handles, defs_index, defs_metacopy, defs_workdir  # noqa: F401  (they register scenarios)
from .registry import FIXABLE, SCENARIOS, TOKEN, Scenario
from .helpers import diff_snapshots, kutil, mkdir, write

# =========================================================================== running


def run(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    p = kutil.run_ovlfsck(*args, env=env)
    assert "Traceback" not in p.stderr, p.stderr
    return p


def run_json(*args: str, env: dict | None = None) -> tuple[int, dict]:
    p = run(*args, env=env)
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
    # The same report when the read-ahead child lists every directory from the start (its
    # listings take the walk's lazy paths: walk.Chains, fsio.LazyListing, the passes'
    # special-entry loops); small layer sets otherwise never start it.
    _rc, pre = run_json("check", "-n", "--json", *stack, *sev,
                        env=dict(os.environ, OVLFSCK_PREFETCH="1"))
    assert (pre["exit_code"], pre["problems"], pre["counts"]) == \
        (doc["exit_code"], doc["problems"], doc["counts"]), kutil.format_report(pre)
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
