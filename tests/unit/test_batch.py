"""Group commit of xattr fixes (issue 5, repair throughput).

* `Journal.apply_batch`: the same records as `apply()` (undo restores every old value), one
  write-ahead barrier for the batch, a failed operation recorded as failed without stopping
  the others;
* the engine: a queued fix takes its place in the report at once and is shown once its
  batch has landed (as it ended), a read of the written object through the
  context sees the queued value, a read through `ctx.xa` lands the batch first, and a round
  whose fixes all rewrite handles in place (`rechecks=False`) is not walked again.
"""
from __future__ import annotations

import json
import os

import pytest
import xattr

from ovlfsck import engine
from ovlfsck.engine import CheckContext, Finding, LayerInfo, Mode, Policy, RunResult
from ovlfsck.problems import BY_CODE
from ovlfsck.repair import Journal, Quarantine, RemoveXattr, SetXattr, undo
from ovlfsck.stack import build_stack

needs_root = pytest.mark.skipif(os.geteuid() != 0, reason="needs root (trusted.* xattrs)")
pytestmark = needs_root
NS = "trusted.overlay."


def records(path: str) -> list[dict]:
    with open(path, encoding="utf-8") as fh:
        return [json.loads(line) for line in fh]


@pytest.fixture
def stack(tmp_path):
    for d in ("lower", "upper/d", "work/index", "work/work"):
        (tmp_path / d).mkdir(parents=True)
    for name in ("a", "b", "d/c"):
        (tmp_path / "upper" / name).write_text(name)
    xattr.set(str(tmp_path / "upper/a"), NS + "origin", b"old-a", nofollow=True)
    xattr.set(str(tmp_path / "upper/b"), NS + "origin", b"old-b", nofollow=True)
    return build_stack(lowers=[str(tmp_path / "lower")], upper=str(tmp_path / "upper"),
                       work=str(tmp_path / "work"))


def xget(stack, rel, suffix):
    try:
        return xattr.get(os.path.join(stack.upper.path, rel), NS + suffix, nofollow=True)
    except OSError:
        return None


# --------------------------------------------------------------------------- the journal


def test_apply_batch_writes_all_and_undo_restores_all(stack):
    up = stack.upper
    ops = [SetXattr(up, "a", NS + "origin", b"new-a"), SetXattr(up, "d/c", NS + "origin", b"c"),
           RemoveXattr(up, "b", NS + "origin")]
    with Journal.create(stack) as j:
        assert j.apply_batch(ops) == [None, None, None]
    assert (xget(stack, "a", "origin"), xget(stack, "d/c", "origin"), xget(stack, "b", "origin")) \
        == (b"new-a", b"c", None)
    recs = records(j.path)
    kinds = [r.get("rec") for r in recs[1:]]
    # every op record comes before every change (and its done record)
    assert kinds == ["op", "op", "op", "done", "done", "done", "end"], kinds
    lines = undo(j.path, stack)
    assert len(lines) == 3 and not lines.refused, lines
    assert (xget(stack, "a", "origin"), xget(stack, "d/c", "origin"), xget(stack, "b", "origin")) \
        == (b"old-a", None, b"old-b")


def test_a_failed_operation_does_not_stop_the_others(stack):
    up = stack.upper
    ops = [SetXattr(up, "missing", NS + "origin", b"x"), RemoveXattr(up, "d/c", NS + "origin"),
           SetXattr(up, "b", NS + "origin", b"new-b")]
    with Journal.create(stack) as j:
        res = j.apply_batch(ops)
    assert res[0] and "no such file" in res[0]
    assert res[1] and "has no xattr" in res[1]
    assert res[2] is None and xget(stack, "b", "origin") == b"new-b"
    assert [r["rec"] for r in records(j.path)[1:]] == ["op", "done", "end"]


def test_an_object_replaced_after_planning_is_not_written(stack, monkeypatch):
    up = stack.upper
    real_sync = Journal._sync
    path = os.path.join(up.path, "a")

    def replace_then_sync(self):
        os.rename(os.path.join(up.path, "b"), path)  # another inode at that path now
        monkeypatch.setattr(Journal, "_sync", real_sync)
        real_sync(self)

    monkeypatch.setattr(Journal, "_sync", replace_then_sync)
    with Journal.create(stack) as j:
        res = j.apply_batch([SetXattr(up, "a", NS + "origin", b"new-a")])
    assert res[0] and "replaced" in res[0]
    assert xget(stack, "a", "origin") == b"old-b"  # the other file was not touched
    assert [r["rec"] for r in records(j.path)[1:]] == ["op", "failed", "end"]


def test_every_record_is_on_disk_before_the_first_change(stack, monkeypatch):
    """The write-ahead barrier: at the batch's first fsync, all its records are written and
    nothing is changed yet."""
    up = stack.upper
    seen = []
    real_sync = Journal._sync

    def check_then_sync(self):
        if not seen:
            with open(self.path, encoding="utf-8") as fh:
                seen.append([json.loads(line).get("rec") for line in fh][1:])
            seen.append((xget(stack, "a", "origin"), xget(stack, "b", "origin")))
        real_sync(self)

    monkeypatch.setattr(Journal, "_sync", check_then_sync)
    with Journal.create(stack) as j:
        j.apply_batch([SetXattr(up, "a", NS + "origin", b"new-a"),
                       SetXattr(up, "b", NS + "origin", b"new-b")])
    assert seen == [["op", "op"], (b"old-a", b"old-b")]
    assert (xget(stack, "a", "origin"), xget(stack, "b", "origin")) == (b"new-a", b"new-b")


def test_only_xattr_operations_are_batched(stack):
    with Journal.create(stack) as j:
        with pytest.raises(TypeError):
            j.apply_batch([Quarantine(stack.upper, "a")])


# --------------------------------------------------------------------------- the engine


def make_ctx(stack, mode=Mode.YES) -> CheckContext:
    infos = {lay.name: LayerInfo(writable=True) for lay in stack.all_layers}
    return CheckContext(stack, "trusted", Policy(mode), infos, lambda: Journal.create(stack),
                        None, None, RunResult())


def finding(stack, rel, value, **kw) -> Finding:
    return Finding(BY_CODE["OVL520"], stack.upper, rel, "test",
                   ops=(SetXattr(stack.upper, rel, NS + "origin", value),), **kw)


def test_a_queued_fix_is_reported_and_written_at_the_flush(stack):
    ctx = make_ctx(stack)
    assert ctx.fix(finding(stack, "a", b"new-a", batch_ok=True))
    assert ctx.result.outcomes[-1].fixed
    assert xget(stack, "a", "origin") == b"old-a"  # queued, not written yet
    ctx.flush()
    assert xget(stack, "a", "origin") == b"new-a"
    ctx.journal.close()


def test_reads_see_the_queued_value_or_land_the_batch(stack):
    from ovlfsck.fsio import lstat_entry

    ctx = make_ctx(stack)
    ctx.fix(finding(stack, "a", b"new-a", batch_ok=True))
    entry = lstat_entry(os.path.join(stack.upper.path, "a"))
    # through the context: the value it will have, the batch still queued
    assert ctx.xattrs_of(stack.upper, "a", entry)["origin"] == b"new-a"
    assert xget(stack, "a", "origin") == b"old-a"
    # a direct read of that object lands the batch first
    assert ctx.xa.read_all(os.path.join(stack.upper.path, "a"))["origin"] == b"new-a"
    assert xget(stack, "a", "origin") == b"new-a" and not ctx._batch
    ctx.journal.close()


def test_queued_view_from_the_entry_until_a_change_of_the_run_landed(stack, monkeypatch):
    """An entry whose xattrs were read (e.g. by the read-ahead child) gets its queued view
    without a read; once a change of this run is on disk there, the disk is read."""
    from ovlfsck.fsio import lstat_entry

    ctx = make_ctx(stack)
    path = os.path.join(stack.upper.path, "a")
    entry = lstat_entry(path)
    assert entry.xattrs(ctx.xa)["origin"] == b"old-a"  # cached in the entry
    xattr.set(path, NS + "impure", b"y", nofollow=True)  # the disk says more than the cache
    reads = []
    real = ctx.xa.read_all
    monkeypatch.setattr(ctx.xa, "read_all", lambda p: reads.append(p) or real(p))
    ctx.fix(finding(stack, "a", b"new-a", batch_ok=True))
    assert ctx.xattrs_of(stack.upper, "a", entry) == {"origin": b"new-a"}
    assert reads == [] and entry._xattrs == {"origin": b"old-a"}  # the cache is not changed
    ctx.flush()
    ctx.seen.clear()  # as in a later round (the same object may be fixed again)
    ctx.changed_round = set()
    ctx.fix(finding(stack, "a", b"newer-a", batch_ok=True))
    assert ctx._pending
    assert ctx.xattrs_of(stack.upper, "a", entry) == {"origin": b"newer-a", "impure": b"y"}
    assert reads == [path]
    ctx.flush()
    ctx.journal.close()


def test_an_immediate_fix_lands_the_batch_before_it(stack):
    ctx = make_ctx(stack)
    ctx.fix(finding(stack, "a", b"new-a", batch_ok=True))
    ctx.fix(finding(stack, "b", b"new-b"))  # not batchable: applied now, after the batch
    ctx.journal.close()
    seqs = [(r["path"], r["seq"]) for r in records(ctx.journal.path) if r.get("rec") == "op"]
    assert seqs == [("a", 1), ("b", 2)]


def test_a_failed_queued_fix_is_reported_as_not_fixed(stack):
    ctx = make_ctx(stack)
    ctx.fix(finding(stack, "gone", b"x", batch_ok=True))
    ctx.flush()
    out = ctx.result.outcomes[-1]
    assert not out.fixed and out.note.startswith("fix failed") and ctx.result.errors
    ctx.journal.close()


class Seen:
    """A listener (what the text report is): what it was shown, and when."""

    def __init__(self):
        self.shown = []

    def on_outcome(self, outcome):
        self.shown.append((outcome.finding.path, outcome.fixed, outcome.note))


def test_a_queued_fix_is_shown_only_once_written(stack):
    """The text report must not print 'fixed' for a change that is not on disk yet, nor for
    one that then fails: the listener sees each queued outcome at the flush, as it ended."""
    ctx = make_ctx(stack)
    ctx.listener = seen = Seen()
    ctx.fix(finding(stack, "a", b"new-a", batch_ok=True))
    ctx.fix(finding(stack, "gone", b"x", batch_ok=True))
    assert seen.shown == [] and [o.finding.path for o in ctx.result.outcomes] == ["a", "gone"]
    ctx.flush()
    assert [(p, fixed) for p, fixed, _note in seen.shown] == [("a", True), ("gone", False)]
    assert seen.shown[1][2].startswith("fix failed")
    ctx.journal.close()


def test_an_interrupted_batch_is_not_reported_fixed(stack, monkeypatch):
    ctx = make_ctx(stack)
    ctx.listener = seen = Seen()
    ctx.fix(finding(stack, "a", b"new-a", batch_ok=True))

    def interrupted(self, ops):
        raise KeyboardInterrupt

    monkeypatch.setattr(Journal, "apply_batch", interrupted)
    with pytest.raises(KeyboardInterrupt):
        ctx.flush()
    out = ctx.result.outcomes[-1]
    assert not out.fixed and "interrupted" in out.note and seen.shown == []
    ctx.journal.close()


def test_interactive_runs_apply_each_fix_at_once(stack):
    class Yes:
        def ask(self, finding, default):
            return True

    ctx = make_ctx(stack, Mode.ASK)
    ctx.asker = Yes()
    ctx.fix(finding(stack, "a", b"new-a", batch_ok=True))
    assert xget(stack, "a", "origin") == b"new-a" and not ctx._batch
    ctx.journal.close()


@pytest.mark.parametrize("rechecks, rounds", [(False, 1), (True, 2)])
def test_a_round_of_in_place_rewrites_is_not_walked_again(stack, monkeypatch, rechecks, rounds):
    """A pass that fixes `a` once: with rechecks=False the run stops after that round."""
    import types

    walks = []

    def check(ctx, visit):
        if visit.path == "":
            walks.append(1)
            if xget(stack, "a", "origin") == b"old-a":
                ctx.fix(finding(stack, "a", b"new-a", batch_ok=True, rechecks=rechecks))

    monkeypatch.setattr("ovlfsck.passes.PASSES", (types.SimpleNamespace(check=check),))
    result = engine.run(stack, Policy(Mode.YES), None)
    assert xget(stack, "a", "origin") == b"new-a"
    assert len(walks) == rounds
    assert [o.fixed for o in result.outcomes] == [True]


def test_renames_are_batched_in_order_and_undone(stack):
    from ovlfsck.repair import Rename

    work = stack.work
    idx = os.path.join(work.path, "index")
    with open(os.path.join(idx, "old1"), "w") as fh:
        fh.write("1")
    xattr.set(os.path.join(idx, "old1"), NS + "origin", b"o1", nofollow=True)
    ops = [SetXattr(work, "index/old1", NS + "origin", b"n1"),  # before the rename, by its old name
           Rename(work, "index/old1", "index/new1"),
           Rename(work, "index/absent", "index/new2"),
           Rename(stack.upper, "a", "d/a-moved")]
    with Journal.create(stack) as j:
        res = j.apply_batch(ops)
    assert res[:2] == [None, None] and res[3] is None
    assert res[2] and "no such file" in res[2]
    assert os.listdir(idx) == ["new1"]
    assert xattr.get(os.path.join(idx, "new1"), NS + "origin", nofollow=True) == b"n1"
    assert os.path.exists(os.path.join(stack.upper.path, "d/a-moved"))
    lines = undo(j.path, stack)
    assert len(lines) == 3 and not lines.refused, lines
    assert os.listdir(idx) == ["old1"]
    assert xattr.get(os.path.join(idx, "old1"), NS + "origin", nofollow=True) == b"o1"
    assert os.path.exists(os.path.join(stack.upper.path, "a"))


def test_a_queued_rename_lands_before_its_target_is_looked_at(stack):
    from ovlfsck.repair import Rename

    ctx = make_ctx(stack)
    f = Finding(BY_CODE["OVL620"], stack.upper, "a", "test",
                ops=(Rename(stack.upper, "a", "a2"),), batch_ok=True)
    assert ctx.fix(f)
    target = os.path.join(stack.upper.path, "a2")
    assert not os.path.exists(target)  # queued
    ctx.land(target)
    assert os.path.exists(target) and not ctx._batch
    ctx.journal.close()


def test_norm_is_normpath():
    """engine._norm skips os.path.normpath only for paths it would leave unchanged."""
    import itertools

    from ovlfsck.engine import _norm

    parts = ["a", ".", "..", "", ".b", "b.", "...", "/", "c d"]
    seen = 0
    for n in range(1, 5):
        for combo in itertools.product(parts, repeat=n):
            for lead in ("/", "", "//", "///"):
                p = lead + "/".join(combo)
                if p:
                    assert _norm(p) == os.path.normpath(p), p
                    seen += 1
    assert seen > 20000
    assert _norm("/x/y") == "/x/y" and _norm("/x/./y") == "/x/y" and _norm("/x/.y") == "/x/.y"
