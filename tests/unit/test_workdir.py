"""The workdir pass (passes/workdir.py): work/work leftovers, temporaries, incompat/volatile,
and work/work or work/index of the wrong type, on layer sets built from specs.

The kernel behaviour these rules encode was measured on 6.18 (see problems_workdir.py); the
real-kernel scenarios are in tests/scenarios/defs_workdir.py.
"""
import json
import os
import stat
import time

import pytest

from ovlfsck.cli import app, invoke
from ovlfsck.fixture import build
from ovlfsck.passes import workdir as workdir_pass
from ovlfsck.problems import BY_CODE, Severity

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="needs root for whiteouts and trusted.* xattrs")

# A kernel-made state: a lower file deleted through the mount leaves a whiteout in the upper,
# hard-linked with the spare whiteout the kernel keeps as a `#<hex>` temporary.
BASE = """
[lower:0]
file f text=f
file g text=g
[upper]
dir keep
[work]
dir work mode=0000
"""


class Run:
    def __init__(self, tmp_path, capsys, spec):
        self.root = str(tmp_path)
        self.capsys = capsys
        self.layers = build(spec, self.root)
        self.work = self.layers["work"]
        self.opts = (f"lowerdir={self.layers['lower:0']},upperdir={self.layers['upper']},"
                     f"workdir={self.work}")

    def check(self, *args):
        self.capsys.readouterr()
        code = invoke(app, ["check", "--json", *args, "-o", self.opts], "ovlfsck")
        doc = json.loads(self.capsys.readouterr().out)
        assert doc["exit_code"] == code
        return code, doc

    def undo(self, journal):
        self.capsys.readouterr()
        code = invoke(app, ["undo", journal], "ovlfsck")
        out = self.capsys.readouterr().out
        assert code == 0 and "refused" not in out, out
        return out

    def w(self, *parts):
        return os.path.join(self.work, *parts)


def codes(doc, severity=None):
    return sorted((p["code"], p["layer"], p["path"]) for p in doc["problems"]
                  if severity is None or p["severity"] == severity)


def tree(root):
    """Everything under root except ovlfsck's own state directory: path -> (type, ino, data)."""
    out = {}
    for dirpath, dirs, files in os.walk(root):
        rel_dir = os.path.relpath(dirpath, root)
        if rel_dir == "ovlfsck" or rel_dir.startswith("ovlfsck/"):
            continue
        for name in dirs + files:
            if rel_dir == "." and name == "ovlfsck":
                continue
            p = os.path.join(dirpath, name)
            st = os.lstat(p)
            data = open(p, "rb").read() if stat.S_ISREG(st.st_mode) else None
            out[os.path.relpath(p, root)] = (stat.S_IFMT(st.st_mode), st.st_ino, data)
    return out


@pytest.fixture
def run(tmp_path, capsys):
    return lambda extra="": Run(tmp_path, capsys, BASE + extra)


def spare_whiteout(r, where):
    """The kernel's spare whiteout at `where` (work/#N or index/#N), linked from the upper."""
    os.mknod(r.w(where), stat.S_IFCHR | 0, os.makedev(0, 0))
    os.link(r.w(where), os.path.join(r.layers["upper"], "f"))


# --------------------------------------------------------------------------- no false positives


def test_kernel_made_workdirs_are_clean(run):
    r = run("[work]\ndir index mode=0000\n")
    spare_whiteout(r, "work/#1a2b")
    os.link(r.w("work/#1a2b"), r.w("index/#1a2c"))  # and the index's spare (index=on)
    code, doc = r.check("-n")
    assert code == 0 and doc["problems"] == [], doc


def test_missing_work_and_index_are_fine(tmp_path, capsys):
    r = Run(tmp_path, capsys, "[lower:0]\nfile f text=f\n[upper]\ndir keep\n[work]\n")
    code, doc = r.check("-n")
    assert code == 0 and doc["problems"] == []


def test_other_entries_of_the_workdir_root_are_ignored(run):
    # 6.18 never looks at them (measured); ovlfsck's own state directory lives there too.
    r = run("[work]\nfile foo/bar/baz/qux text=q\nfile #5 text=t\nsymlink zz nowhere\n"
            "dir ovlfsck/quarantine/x/1/a/b\nfile ovlfsck/quarantine/x/1/a/b/c text=c\n")
    code, doc = r.check("-n")
    assert code == 0 and doc["problems"] == [], doc


# --------------------------------------------------------------------------- shallow leftovers


def test_shallow_leftovers_are_info_and_never_touched(run):
    r = run("""
[work]
file work/#1 text=copy-up temp
file work/#2/x text=level two
dir work/#3/y
whiteout work/#4/w
symlink work/foo nowhere
dir work/incompat
file work/incompat/.x text=dot names are not features
whiteout work/plainname
[work]
file index/#9 text=t
dir index/#a/b
""")
    before = tree(r.work)
    code, doc = r.check("-n")
    assert code == 0
    want = [("OVL702", "work", f"work/{n}") for n in ("#1", "#2", "#3", "#4", "foo", "incompat",
                                                       "plainname")]
    want += [("OVL706", "work", "index/#9"), ("OVL706", "work", "index/#a")]
    assert codes(doc) == sorted(want)
    assert {p["severity"] for p in doc["problems"]} == {"info"}
    assert all(p["action"] is None for p in doc["problems"])
    code, doc = r.check("-y")
    assert code == 0 and doc["journal"] is None
    assert tree(r.work) == before


def test_leftover_messages_say_what_the_object_is(run):
    r = run("[work]\nfile work/#1 text=0123456789\ndir work/#2\nfile work/#2/a text=abc\n")
    _, doc = r.check("-n")
    msgs = {p["path"]: p["message"] for p in doc["problems"]}
    assert "regular file, 11 bytes" in msgs["work/#1"]
    assert "holds 1 object, 4 bytes of file data" in msgs["work/#2"]


@pytest.mark.parametrize("kind", ["file", "symlink", "fifo"])
def test_work_work_not_a_directory_is_info(tmp_path, capsys, kind):
    spec = "[lower:0]\nfile f text=f\n[upper]\ndir keep\n[work]\n"
    spec += {"file": "file work text=x\n", "symlink": "symlink work /\n", "fifo": "fifo work\n"}[kind]
    r = Run(tmp_path, capsys, spec)
    code, doc = r.check("-n")
    assert code == 0 and codes(doc) == [("OVL703", "work", "work")]
    assert doc["problems"][0]["severity"] == "info"


# --------------------------------------------------------------------------- OVL701


def test_deep_leftover_is_quarantined_with_its_data(run):
    r = run("""
[work]
file work/#7/b/c/data text=the only copy
file work/#8 text=shallow
dir work/a/b/c
""")
    data_ino = os.lstat(r.w("work/#7/b/c/data")).st_ino
    damaged = tree(r.work)
    code, doc = r.check("-n")
    assert code == 4
    assert codes(doc, "error") == [("OVL701", "work", "work/#7"), ("OVL701", "work", "work/a")]
    msg = {p["path"]: p for p in doc["problems"]}
    assert "'b' is a non-empty directory two levels down" in msg["work/#7"]["message"]
    assert "cleanup of '#7/b' failed (-39)" in msg["work/#7"]["message"]
    assert "only copy" in msg["work/#7"]["action"]
    code, doc = r.check("-p")  # preen-safe: nothing is lost
    assert code == 1 and doc["counts"] == {"found": 2, "fixed": 2, "left": 0}
    assert not os.path.exists(r.w("work/#7")) and not os.path.exists(r.w("work/a"))
    assert os.path.exists(r.w("work/#8"))  # the kernel's business
    qfiles = [os.path.join(d, f) for d, _, fs in os.walk(r.w("ovlfsck", "quarantine")) for f in fs]
    kept = [p for p in qfiles if os.lstat(p).st_ino == data_ino]
    assert len(kept) == 1 and open(kept[0]).read() == "the only copy\n"
    code, doc = r.check("-n")
    assert code == 0 and codes(doc, "error") == []
    r.undo(_last_journal(r))
    assert tree(r.work) == damaged


def test_level_two_entries_that_the_kernel_can_remove_are_not_errors(run):
    # work/work/a/b: a file, an empty dir, a whiteout, a symlink to a directory — all fine.
    r = run("[work]\nfile work/a/f text=x\ndir work/a/d\nwhiteout work/a/w\nsymlink work/a/l /\n")
    code, doc = r.check("-n")
    assert code == 0 and codes(doc) == [("OVL702", "work", "work/a")]


def _last_journal(r):
    d = r.w("ovlfsck")
    return os.path.join(d, sorted(n for n in os.listdir(d) if n.startswith("journal-"))[-1])


# --------------------------------------------------------------------------- OVL704


def test_volatile_marker_needs_an_explicit_yes(run):
    r = run("[work]\nfile work/incompat/volatile/dirty\n")
    damaged = tree(r.work)
    code, doc = r.check("-n")
    assert code == 4 and codes(doc) == [("OVL704", "work", "work/incompat")]
    msg = doc["problems"][0]["message"]
    assert "volatile" in msg and "may be inconsistent" in msg and "discard upper and work" in msg
    assert "overlay with incompat feature 'volatile' cannot be mounted" in msg
    assert "inconsistent" in BY_CODE["OVL704"].prompt and not BY_CODE["OVL704"].preen_ok
    code, doc = r.check("-p")
    assert code == 4 and doc["journal"] is None and tree(r.work) == damaged
    assert "not safe to fix without a decision" in doc["problems"][0]["note"]
    code, doc = r.check("-y")
    assert code == 1 and not os.path.exists(r.w("work/incompat"))
    assert r.check("-n")[0] == 0
    r.undo(_last_journal(r))
    assert tree(r.work) == damaged


def test_unknown_incompat_feature(run):
    r = run("[work]\nfile work/incompat/foo text=x\nfile work/incompat/.hidden text=y\n")
    code, doc = r.check("-n")
    assert code == 4 and codes(doc) == [("OVL704", "work", "work/incompat")]
    msg = doc["problems"][0]["message"]
    assert "unknown incompatible feature(s) 'foo'" in msg and "'.hidden'" not in msg


def test_dot_names_in_incompat_are_cleaned_like_any_other_entry(run):
    # The kernel skips '.'-names before its incompat test, then cleans them at level 2.
    r = run("[work]\nfile work/incompat/.x/y/z text=deep\n")
    code, doc = r.check("-n")
    assert code == 4 and codes(doc) == [("OVL701", "work", "work/incompat")]


def test_incompat_as_a_file_is_a_plain_leftover(run):
    r = run("[work]\nfile work/incompat text=x\n")
    assert codes(r.check("-n")[1]) == [("OVL702", "work", "work/incompat")]


def test_volatile_age_hint(tmp_path, monkeypatch):
    marker = tmp_path / "volatile"
    marker.mkdir()
    (marker / "dirty").write_text("")
    old = time.time() - 86400
    os.utime(marker / "dirty", (old, old))
    monkeypatch.setattr(workdir_pass, "_boot_time", lambda: time.time() - 3600)
    assert "before this system last booted" in workdir_pass._volatile_age(str(marker))
    monkeypatch.setattr(workdir_pass, "_boot_time", lambda: old - 3600)
    assert "during the current boot" in workdir_pass._volatile_age(str(marker))
    monkeypatch.setattr(workdir_pass, "_boot_time", lambda: None)
    assert workdir_pass._volatile_age(str(marker)) == ""


# --------------------------------------------------------------------------- work/index


@pytest.mark.parametrize("kind", ["file", "symlink"])
def test_index_not_a_directory(tmp_path, capsys, kind):
    spec = "[lower:0]\nfile f text=f\n[upper]\ndir keep\n[work]\ndir work mode=0000\n"
    spec += {"file": "file index text=x\n", "symlink": "symlink index work\n"}[kind]
    r = Run(tmp_path, capsys, spec)
    damaged = tree(r.work)
    code, doc = r.check("-n")
    assert code == 4 and codes(doc) == [("OVL705", "work", "index")]
    code, doc = r.check("-p")
    assert code == 1 and not os.path.lexists(r.w("index"))
    assert r.check("-n")[0] == 0
    r.undo(_last_journal(r))
    assert tree(r.work) == damaged


def test_deep_index_temporary(run):
    r = run("[work]\ndir index mode=0000\nfile index/#79/x/y/z text=z\nfile index/#80/x text=x\n")
    spare_whiteout(r, "index/#81")
    code, doc = r.check("-n")
    assert code == 4
    assert codes(doc) == [("OVL706", "work", "index/#80"), ("OVL707", "work", "index/#79")]
    assert "cleanup of '#79/x' failed (-39)" in {p["path"]: p["message"] for p in doc["problems"]}["index/#79"]
    code, doc = r.check("-p")
    assert code == 1 and not os.path.exists(r.w("index/#79"))
    assert os.path.exists(r.w("index/#80")) and os.path.exists(r.w("index/#81"))
    assert r.check("-n")[0] == 0


# --------------------------------------------------------------------------- catalog


def test_catalog_rows():
    rows = [p for p in BY_CODE.values() if p.code.startswith("OVL7")]
    assert {p.code for p in rows} == {f"OVL70{i}" for i in range(1, 8)}
    for p in rows:
        # errors have a fix (quarantine); info rows are reported only
        assert (p.severity is Severity.ERROR) == (p.prompt is not None), p.code
    assert [p.code for p in rows if p.prompt and not p.preen_ok] == ["OVL704"]
