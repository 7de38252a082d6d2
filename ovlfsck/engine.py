"""Runs the passes over the merged walk; `CheckContext.fix()` is the single choke point.

Passes build Findings and call `ctx.fix(finding)`; only here is it decided, under
-n/-y/-p/ask, whether a fix is applied, and only here are fixes journaled and applied.
"""
from __future__ import annotations

import enum
import os
import sys
from dataclasses import dataclass, field
from typing import Callable, Optional, Protocol

from ovlfsck import handles
from ovlfsck.errors import Cancelled, ExitCode, OperationalError
from ovlfsck.fsio import Xattrs
from ovlfsck.problems import BY_CODE, Problem, Severity
from ovlfsck.stack import Layer, Role, Stack


class Mode(enum.Enum):
    NO = "no"
    YES = "yes"
    PREEN = "preen"
    ASK = "ask"


@dataclass(frozen=True)
class Policy:
    """The repair policy: an immutable value; per-layer restrictions are derived from it."""

    mode: Mode
    repair_lowers: bool = False
    severities: tuple[tuple[str, Severity], ...] = ()

    def severity_of(self, problem: Problem) -> Severity:
        for code, sev in self.severities:
            if code == problem.code:
                return sev
        return problem.severity


@dataclass(frozen=True)
class Finding:
    """One problem at one place, with the operations that would fix it."""

    problem: Problem
    layer: Optional[Layer]
    path: str
    detail: str = ""
    ops: tuple = ()
    action: Optional[str] = None  # what the fix does, for the report
    preen_ok: Optional[bool] = None  # overrides the catalog (e.g. an ambiguous duplicate)
    compat: Optional[tuple[str, str]] = None  # fsck.overlay wording when it differs per fix
    # The fix only writes xattrs or renames (SetXattr/RemoveXattr/Rename) and nothing of
    # this round needs its result at once: without questions it may be group-committed with
    # others (one journal fsync per batch instead of two or three per operation). Reads of
    # a changed path through ctx.xa make the batch land first (ctx.land() for other reads).
    batch_ok: bool = False
    # False: the fix rewrites a handle in place (same object, same type, the new value
    # computed from what the object now is), which changes nothing another check of this
    # round looked at; a round whose fixes are all of this kind needs no re-check.
    rechecks: bool = True

    @property
    def key(self) -> tuple[str, str, str]:
        return (self.problem.code, self.layer.name if self.layer else "", self.path)

    @property
    def can_preen(self) -> bool:
        return self.problem.preen_ok if self.preen_ok is None else self.preen_ok


@dataclass
class Outcome:
    finding: Finding
    severity: Severity
    fixed: bool
    answer: Optional[str]  # 'yes' | 'no' | None (no question asked)
    note: Optional[str] = None  # why it was left, or what went wrong

    @property
    def counted(self) -> bool:
        return self.severity is Severity.ERROR


class Asker(Protocol):
    def ask(self, finding: Finding, default: bool) -> bool: ...


class TerminalAsker:
    """Interactive questions: y/n, a = yes to all of this kind, q = quit (exit 32)."""

    def __init__(self, stream_in=None, stream_out=None) -> None:
        self.stdin = stream_in or sys.stdin
        self.out = stream_out or sys.stderr
        self.all_yes: set[str] = set()

    def ask(self, finding: Finding, default: bool) -> bool:
        code = finding.problem.code
        if code in self.all_yes:
            return True
        hint = "[Y/n/a/q]" if default else "[y/N/a/q]"
        while True:
            self.out.write(f"{finding.problem.prompt}? {hint} ")
            self.out.flush()
            line = self.stdin.readline()
            if not line:
                return default
            ans = line.strip().lower()
            if ans == "":
                return default
            if ans in ("y", "yes"):
                return True
            if ans in ("n", "no"):
                return False
            if ans in ("a", "all"):
                self.all_yes.add(code)
                return True
            if ans in ("q", "quit"):
                raise Cancelled("cancelled by the user; the journal is consistent")
            self.out.write("Please answer y (yes), n (no), a (yes to all of this kind) or q (quit).\n")


class Listener(Protocol):
    def on_outcome(self, outcome: Outcome) -> None: ...


@dataclass
class LayerInfo:
    writable: bool
    uuid: Optional[bytes] = None


@dataclass
class RunResult:
    outcomes: list[Outcome] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)  # operational errors met on the way
    journal: Optional[str] = None
    features: object = None  # passes.features.FeatureReport of the last round

    @property
    def found(self) -> int:
        return sum(1 for o in self.outcomes if o.counted)

    @property
    def fixed(self) -> int:
        return sum(1 for o in self.outcomes if o.counted and o.fixed)

    @property
    def left(self) -> int:
        return self.found - self.fixed

    @property
    def exit_code(self) -> int:
        code = ExitCode.OK
        if self.fixed:
            code |= ExitCode.FIXED
        if self.left:
            code |= ExitCode.UNCORRECTED
        if self.errors:
            code |= ExitCode.OPERATIONAL
        return code


class CheckContext:
    """What the passes see: the stack, the xattr reader, and fix()."""

    def __init__(
        self,
        stack: Stack,
        namespace: str,
        policy: Policy,
        layer_info: dict[str, LayerInfo],
        journal_factory: Optional[Callable[[], object]],
        asker: Optional[Asker],
        listener: Optional[Listener],
        result: RunResult,
    ) -> None:
        self.stack = stack
        self.policy = policy
        self.xa = Xattrs(namespace)
        self.layer_info = layer_info
        self._journal_factory = journal_factory
        self.journal = None
        self.asker = asker
        self.listener = listener
        self.result = result
        self.seen: set[tuple[str, str, str]] = set()
        self.changed: set[tuple[str, str]] = set()  # (layer name, relpath) written this run
        self.changed_round: set[tuple[str, str]] = set()  # ... in the current round
        self.walker = None  # set by run()
        self.last_round = False
        self.features = None  # filled by passes.features
        self._round_state: dict[str, object] = {}
        self._batch: list[Outcome] = []  # fixes reported, their ops not applied yet
        self._batch_ops = 0
        self._pending: dict[str, list] = {}  # host path (normalised) -> its queued ops
        # Host paths (normalised) that an op of this run changed on disk: an Entry's cached
        # xattrs of such a path may predate the change.
        self._landed: set[str] = set()
        self.recheck = False  # this round made a fix (or left a finding) that needs a re-check

    # ------------------------------------------------------------------ helpers

    def xname(self, suffix: str) -> str:
        return self.xa.name(suffix)

    def layer_uuid(self, layer: Layer) -> Optional[bytes]:
        info = self.layer_info.get(layer.name)
        if info is None:
            return None
        if info.uuid is None:
            info.uuid = handles.fs_uuid(layer.path) or b""
        return info.uuid or None

    def handle_of(self, layer: Layer, path: str) -> Optional[handles.OvlFh]:
        """The handle the kernel would store for the object at host path `path`."""
        uuid = self.layer_uuid(layer)
        if uuid is None:
            return None
        try:
            return handles.encode_for(path, uuid)
        except OSError:
            return None

    def round_state(self, name: str, factory: Callable[[], object]):
        """A pass's state for the current round (created on first use, dropped when the
        next round starts: a re-check after fixes must not see stale facts)."""
        if name not in self._round_state:
            self._round_state[name] = factory()
        return self._round_state[name]

    def xattrs_of(self, layer: Layer, relpath: str, entry) -> dict[str, bytes]:
        """An entry's overlay xattrs, re-read if a fix of this run touched it."""
        if self.changed and (layer.name, relpath) in self.changed:
            if self._pending:
                host = _norm(entry.path)
                queued = self._pending.get(host)
                if queued is not None:
                    from ovlfsck.repair import Rename

                    cached = entry._xattrs
                    if cached is not None and host not in self._landed and not any(
                            isinstance(op, Rename) for op in queued):
                        # Nothing of this run is on disk there yet: what the entry read
                        # is what the disk shows; only the queued ops change it.
                        return self._changed_by(dict(cached), queued)
                    return self._as_queued(entry.path, queued)
            return self.xa.read_all(entry.path)
        x = entry._xattrs  # fsio.Entry's cache: most entries were read (or prefetched) already
        if x is None:
            x = entry.xattrs(self.xa)
        return x

    def operational(self, message: str) -> None:
        self.result.errors.append(message)

    def _writable(self, finding: Finding) -> Optional[str]:
        """None if every op may be applied, else why not."""
        for op in finding.ops:
            layer: Layer = op.layer
            info = self.layer_info.get(layer.name)
            if layer.role in (Role.LOWER, Role.DATA) and not self.policy.repair_lowers:
                return f"{layer.name} is a lower layer: repaired only with --repair-lowers"
            if info is None or not info.writable:
                return f"{layer.name} is read-only: checked, never written"
        return None

    # ------------------------------------------------------------------ the choke point

    def fix(self, finding: Finding) -> bool:
        """Report `finding`; apply its fix if the policy says so. True if fixed."""
        severity = self.policy.severity_of(finding.problem)
        if severity is Severity.IGNORE or finding.key in self.seen:
            return False
        if self._touched_this_round(finding):
            # An earlier fix of this round changed this object: what the pass saw is
            # stale. The next round (there is one, since something was fixed) re-checks it;
            # in the last round it is reported as left, never dropped.
            if not self.last_round:
                self.recheck = True
                return False
            self.seen.add(finding.key)
            self._emit(Outcome(finding, severity, False, None,
                               "changed by another fix of this run: run the check again"))
            return False
        self.seen.add(finding.key)
        if severity is not Severity.ERROR:
            self._emit(Outcome(finding, severity, False, None))
            return False
        if not finding.ops:
            self._emit(Outcome(finding, severity, False, None, "no automatic fix"))
            return False
        reason = self._writable(finding) if self.policy.mode is not Mode.NO else None
        if reason:
            self._emit(Outcome(finding, severity, False, "no", reason))
            return False
        accepted = self._decide(finding, finding.can_preen)
        if not accepted:
            note = None
            if self.policy.mode is Mode.PREEN:
                note = "not safe to fix without a decision: run with -y or interactively"
            self._emit(Outcome(finding, severity, False, "no", note))
            return False
        if finding.rechecks:
            self.recheck = True
        if finding.batch_ok and self.policy.mode is not Mode.ASK and self._queue(finding, severity):
            return True
        note = self._apply(finding)
        self._emit(Outcome(finding, severity, note is None, "yes", note))
        return note is None

    def _touched_this_round(self, finding: Finding) -> bool:
        keys = {(op.layer.name, op.relpath) for op in finding.ops}
        if finding.layer is not None:
            keys.add((finding.layer.name, finding.path))
        return bool(keys & self.changed_round)

    def choose(self, finding: Finding) -> bool:
        """A follow-up choice after a fix (not a problem: never counted when declined)."""
        if not finding.ops or self._writable(finding):
            return False
        accepted = self._decide(finding, finding.can_preen)
        if accepted:
            self.recheck = True
            note = self._apply(finding)
            self._emit(Outcome(finding, Severity.INFO, note is None, "yes", note))
            return note is None
        self._emit(Outcome(finding, Severity.INFO, False, "no"))
        return False

    def _decide(self, finding: Finding, can_preen: bool) -> bool:
        mode = self.policy.mode
        if mode is Mode.NO:
            return False
        if mode is Mode.YES:
            return True
        if mode is Mode.PREEN:
            return can_preen
        assert self.asker is not None
        if self.listener is not None and hasattr(self.listener, "before_question"):
            self.listener.before_question(finding)
        return self.asker.ask(finding, can_preen)

    # ------------------------------------------------------------------ group commit

    BATCH_OPS = 4096  # operations per group commit

    def _queue(self, finding: Finding, severity: Severity) -> bool:
        """Queue `finding`'s ops for the next group commit; its outcome takes its place in
        the result now (the report's order), and is shown when the batch has landed (as
        fixed, or not with the reason). False (and nothing done) when the journal cannot
        take batches: the caller applies it now."""
        from ovlfsck.repair import RemoveXattr, Rename, SetXattr

        if not all(isinstance(op, (SetXattr, RemoveXattr, Rename)) for op in finding.ops):
            return False
        journal = self._get_journal()
        if not hasattr(journal, "apply_batch"):
            return False
        paths = [_host(op.layer, op.relpath) for op in finding.ops]
        paths += [_host(op.layer, op.new_relpath) for op in finding.ops if isinstance(op, Rename)]
        if any(p in self._pending for p in paths):
            self.flush()  # a batch is planned against the state before it: one change per path
        if finding.rechecks:
            # In-place handle rewrites (rechecks=False) change objects of directories the
            # walk has listed already: what the read-ahead child holds stays true.
            self._stop_prefetch()
        for op in finding.ops:
            for rel in self._mark_changed(op):
                self._pending.setdefault(_host(op.layer, rel), []).append(op)
        outcome = Outcome(finding, severity, True, "yes")
        self._batch.append(outcome)
        self._batch_ops += len(finding.ops)
        self.xa.before_read = self._before_read
        self.result.outcomes.append(outcome)  # shown by flush(), once it is known to hold
        if self._batch_ops >= self.BATCH_OPS:
            self.flush()
        return True

    def _before_read(self, path: str) -> None:
        if self._pending and _norm(path) in self._pending:
            self.flush()

    def land(self, path: str) -> None:
        """Make the queued fixes that change host path `path` (if any) land on disk: call
        before looking at that path other than through ctx.xa (lstat, exists...)."""
        self._before_read(path)

    def _as_queued(self, path: str, ops: list) -> dict[str, bytes]:
        """The xattrs `path` has once its queued ops are applied (what the disk shows now,
        changed as they will change it), without landing the batch."""
        from ovlfsck.repair import Rename

        if any(isinstance(op, Rename) for op in ops):
            self.flush()  # the object moves: read what is there once it has
            return self.xa.read_all(path)
        hook, self.xa.before_read = self.xa.before_read, None
        try:
            x = dict(self.xa.read_all(path))
        finally:
            self.xa.before_read = hook
        return self._changed_by(x, ops)

    def _changed_by(self, x: dict[str, bytes], ops: list) -> dict[str, bytes]:
        """xattrs `x` (changed in place) as the queued `ops` leave them."""
        from ovlfsck.repair import SetXattr

        prefix = self.xa.prefix
        for op in ops:
            if not op.name.startswith(prefix):
                continue
            suffix = op.name[len(prefix):]
            if isinstance(op, SetXattr):
                x[suffix] = op.value
            else:
                x.pop(suffix, None)
        return x

    def flush(self) -> None:
        """Apply the queued fixes (one group commit). A fix whose operation failed is
        marked not fixed, with the reason, and counted as an operational error."""
        batch = self._batch
        if not batch:
            return
        self._landed.update(self._pending)
        self._batch, self._batch_ops, self._pending = [], 0, {}
        self.xa.before_read = None
        ops = [op for o in batch for op in o.finding.ops]
        try:
            results = self.journal.apply_batch(ops)
        except (OSError, ValueError, OperationalError) as exc:
            results = [str(exc)] * len(ops)
        except BaseException:
            # Interrupted: the journal tells what was changed (undo reads it); the report
            # must not claim these fixes.
            for outcome in batch:
                outcome.fixed = False
                outcome.note = "interrupted before this fix was known to be written"
            raise
        self.result.journal = getattr(self.journal, "path", None)
        k = 0
        for outcome in batch:
            n = len(outcome.finding.ops)
            failed = [r for r in results[k:k + n] if r is not None]
            k += n
            if failed:
                f = outcome.finding
                outcome.fixed = False
                outcome.note = f"fix failed: {failed[0]}"
                self.operational(f"{f.layer.name if f.layer else ''}:{f.path}: fix failed: {failed[0]}")
            if self.listener is not None:
                self.listener.on_outcome(outcome)

    def _mark_changed(self, op) -> tuple[str, ...]:
        """Record the paths `op` changes (a rename: both) as changed in this run and round."""
        rels = (op.relpath, op.new_relpath) if hasattr(op, "new_relpath") else (op.relpath,)
        for rel in rels:
            self.changed.add((op.layer.name, rel))
            self.changed_round.add((op.layer.name, rel))
        return rels

    def _stop_prefetch(self) -> None:
        """A write is about to be made: the walk reads everything itself from now on (what
        the read-ahead child holds may be stale). Walker.close() stops the child, or keeps
        it from starting."""
        if self.walker is not None:
            self.walker.close()

    def _get_journal(self):
        if self.journal is None:
            assert self._journal_factory is not None, "a -n run has no journal"
            self.journal = self._journal_factory()
        return self.journal

    def _apply(self, finding: Finding) -> Optional[str]:
        self.flush()  # in order: what was queued before is on disk before this
        self._stop_prefetch()
        self._get_journal()
        try:
            for op in finding.ops:
                for rel in self._mark_changed(op):
                    self._landed.add(_host(op.layer, rel))
                self.journal.apply(op)
        except (OSError, ValueError, OperationalError) as exc:
            msg = f"{finding.layer.name if finding.layer else ''}:{finding.path}: fix failed: {exc}"
            self.operational(msg)
            return f"fix failed: {exc}"
        self.result.journal = getattr(self.journal, "path", None)
        return None

    def _emit(self, outcome: Outcome) -> None:
        self.result.outcomes.append(outcome)
        if self.listener is not None:
            self.listener.on_outcome(outcome)


def _host(layer: Layer, relpath: str) -> str:
    return _norm(os.path.join(layer.path, relpath))


def _norm(path: str) -> str:
    """os.path.normpath(path), without its cost for a path that is normal already (absolute,
    no empty, '.' or '..' component, no trailing slash: what the walk makes; a name that
    starts with a dot just takes the long way)."""
    if path[:1] == "/" and path[-1:] != "/" and "//" not in path and "/." not in path:
        return path
    return os.path.normpath(path)


def _flush_quietly(ctx: CheckContext) -> None:
    """Apply the queued fixes, also when the round ends with an exception (the journal
    holds every change made; an error here must not hide the one propagating)."""
    if sys.exc_info()[1] is None:
        ctx.flush()
        return
    try:
        ctx.flush()
    except Exception:  # noqa: BLE001 - the propagating exception matters more
        pass


def _progress_bar(stream, round_no: int, delay: float = 1.0, mininterval: float = 0.25):
    if stream is None:
        return None
    from tqdm import tqdm

    desc = "checking" if round_no == 0 else f"re-checking ({round_no + 1})"
    # delay: short runs show no bar at all; leave=False: the bar does not stay on screen.
    return tqdm(total=1, desc=desc, unit="dir", file=stream, delay=delay, leave=False,
                dynamic_ncols=True, mininterval=mininterval)


def _layer_info(stack: Stack, preflight, mode: Mode) -> dict[str, LayerInfo]:
    info = {}
    for layer in stack.all_layers:
        status = preflight.statuses.get(layer.name) if preflight else None
        ro = bool(status and status.read_only)
        info[layer.name] = LayerInfo(writable=(mode is not Mode.NO and not ro))
    return info


def run(
    stack: Stack,
    policy: Policy,
    preflight,
    *,
    asker: Optional[Asker] = None,
    listener: Optional[Listener] = None,
    journal_factory: Optional[Callable[[], object]] = None,
    max_rounds: int = 3,
    progress=None,
) -> RunResult:
    """Check (and, per policy, repair) the stack.

    `progress`, when given, is a writable stream for a tqdm bar (directories visited out of
    those known so far; the total grows as the walk discovers more).

    When a round applied fixes, the stack is checked again (at most `max_rounds`), since a
    fix can change what a directory merges with; only findings new to the run are
    reported in later rounds.
    """
    from ovlfsck.passes import PASSES
    from ovlfsck.walk import Walker

    result = RunResult()
    if policy.mode is not Mode.NO and journal_factory is None:
        from ovlfsck.repair import Journal

        def journal_factory() -> object:
            return Journal.create(stack)

    namespace = preflight.namespace if preflight else "trusted"
    infos = _layer_info(stack, preflight, policy.mode)
    ctx = CheckContext(stack, namespace, policy, infos, journal_factory, asker, listener, result)
    for round_no in range(max_rounds):
        fixed_before = sum(1 for o in result.outcomes if o.fixed)

        def on_error(layer: Layer, relpath: str, exc: OSError) -> None:
            ctx.fix(Finding(BY_CODE["OVL901"], layer, relpath, f"cannot list: {exc.strerror}"))
            result.errors.append(f"{layer.name}:{relpath or '.'}: {exc.strerror}")

        # The prefetch child reads ahead until the first fix of the round (what it read
        # could be stale after a write; the walk then reads everything itself). Fixes of
        # the rounds before are all on disk (flushed) before it starts.
        walker = Walker(stack, ctx.xa, on_error, prefetch=True)
        ctx.walker = walker
        ctx.changed_round = set()
        ctx.last_round = round_no == max_rounds - 1
        ctx.recheck = False
        ctx.features = None
        ctx._round_state = {}
        per_visit = [p.check for p in PASSES if hasattr(p, "check")]
        # A quiet visit (walk.DirVisit.quiet) goes only to the passes that may have work there.
        per_quiet = [p.check for p in PASSES
                     if hasattr(p, "check") and not getattr(p, "QUIET_SKIP", False)]
        bar = _progress_bar(progress, round_no)
        try:
            n = 0
            # Not enumerate(): it keeps its last (n, visit) tuple for reuse, so the visit
            # would live on while the walker makes the next one.
            for visit in walker.visits():
                n += 1
                for check in per_quiet if visit.quiet else per_visit:
                    check(ctx, visit)
                # Not held while the walker makes the next visit: a wide directory's
                # listings and chains would otherwise live on beside the next one's.
                del visit
                if bar is not None:
                    bar.total = n + walker.pending_dirs
                    bar.update(1)
        finally:
            walker.close()
            if bar is not None:
                bar.close()
            _flush_quietly(ctx)
        try:
            for p in PASSES:
                if hasattr(p, "finish"):
                    p.finish(ctx)
        finally:
            _flush_quietly(ctx)
        if sum(1 for o in result.outcomes if o.fixed) == fixed_before or not ctx.recheck:
            break
    result.features = ctx.features
    if ctx.journal is not None:
        ctx.journal.close()
        result.journal = ctx.journal.path
    return result
