"""The `ovlfsck` command: a thin typer app. Parse, build the model, call the engine, exit.

Every failure is one sentence on stderr and an fsck(8) exit code; typer/click's own usage
exit (2) becomes 16; Ctrl-C becomes 32.
"""
from __future__ import annotations

import json
import os
import sys
from typing import List, Optional

import functools

import typer

from ovlfsck import __version__, memtune
from ovlfsck.errors import Cancelled, ExitCode, OvlfsckError, UsageError
from ovlfsck.problems import CATALOG, Severity, explain as explain_problem, lookup, markdown

app = typer.Typer(
    add_completion=False,
    pretty_exceptions_enable=False,
    rich_markup_mode=None,
    no_args_is_help=True,
    help="Offline checker and repairer for Linux overlayfs layer sets.",
    context_settings={"help_option_names": ["-h", "--help"]},
)

COMMANDS = ("check", "record", "undo", "explain", "problems", "verify-copy")


def contract(prog: str):
    """Turn our exceptions (and Ctrl-C) into one sentence on stderr and an exit code."""

    def wrap(func):
        @functools.wraps(func)
        def inner(*args, **kwargs):
            try:
                rv = func(*args, **kwargs)
            except Cancelled as exc:
                print(f"{prog}: {exc}", file=sys.stderr)
                raise typer.Exit(ExitCode.CANCELLED)
            except KeyboardInterrupt:
                print(f"{prog}: interrupted; every change made so far is journaled", file=sys.stderr)
                raise typer.Exit(ExitCode.CANCELLED)
            except OvlfsckError as exc:
                print(f"{prog}: {exc}", file=sys.stderr)
                raise typer.Exit(exc.exit_code)
            except BrokenPipeError:
                raise typer.Exit(ExitCode.OPERATIONAL)
            except OSError as exc:
                where = f"{exc.filename}: " if exc.filename else ""
                print(f"{prog}: {where}{exc.strerror or exc}", file=sys.stderr)
                raise typer.Exit(ExitCode.OPERATIONAL)
            raise typer.Exit(rv if isinstance(rv, int) else ExitCode.OK)

        return inner

    return wrap



def parse_severities(items: List[str]) -> tuple:
    out = []
    for item in items:
        key, sep, level = item.partition("=")
        if not sep:
            raise UsageError(f"--severity wants NAME=LEVEL, got {item!r}")
        problem = lookup(key.strip())
        if problem is None:
            raise UsageError(f"--severity: unknown problem {key!r} (see: ovlfsck problems)")
        try:
            sev = Severity(level.strip().lower())
        except ValueError:
            raise UsageError(f"--severity: level must be error, warning, info or ignore, got {level!r}") from None
        out.append((problem.code, sev))
    return tuple(out)


def _mode(no: bool, yes: bool, preen: bool):
    from ovlfsck.engine import Mode

    if sum((no, yes, preen)) > 1:
        raise UsageError("only one of -n, -y and -p (-a) can be given")
    if no:
        return Mode.NO
    if yes:
        return Mode.YES
    if preen:
        return Mode.PREEN
    return Mode.ASK


def run_check(
    options: List[str],
    lowers: List[str],
    upper: Optional[str],
    work: Optional[str],
    mode,
    repair_lowers: bool,
    as_json: bool,
    verbose: bool,
    quiet: bool,
    severities: tuple = (),
    listener_factory=None,
    asker=None,
) -> int:
    """Shared by `ovlfsck check` and the fsck.overlay front end."""
    from ovlfsck import engine, report
    from ovlfsck.engine import Mode, Policy, TerminalAsker
    from ovlfsck.preflight import run_preflight
    from ovlfsck.stack import build_stack

    stack = None
    try:
        stack = build_stack(options, lowers, upper, work)
        if mode is Mode.ASK and asker is None and not sys.stdin.isatty():
            raise OvlfsckError(
                "no terminal to ask questions on: use -n (check only), -p (fix what is safe) or -y (fix everything)"
            )
        pre = run_preflight(stack, want_write=mode is not Mode.NO)
    except OvlfsckError as exc:
        if as_json:  # cli.md: --json always gives one JSON document on stdout
            report.dump_json(report.json_document(stack, "trusted", mode.value, None, exc.exit_code, error=str(exc)))
        raise
    notes = list(pre.notes)
    if pre.namespace_note:
        notes.append(pre.namespace_note)
    if verbose:
        notes.extend(f"option {opt!r} is not used by ovlfsck and was ignored" for opt in stack.ignored_options)
    out = sys.stderr if as_json else sys.stdout
    listener = None
    if listener_factory is not None:
        listener = listener_factory(out)
    elif not as_json:
        listener = report.TextReporter(out, verbose=verbose, quiet=quiet)
    if mode is Mode.ASK and asker is None:
        asker = TerminalAsker()
    policy = Policy(mode, repair_lowers=repair_lowers, severities=severities)
    if not as_json and not quiet:
        for note in notes:
            print(f"note: {note}", file=sys.stderr)
    try:
        # A progress bar only for a person watching: stderr a terminal, no --json, no -q,
        # and no interactive questions interleaving with it.
        show = sys.stderr.isatty() and not as_json and not quiet and mode is not Mode.ASK
        result = engine.run(stack, policy, pre, asker=asker, listener=listener,
                            progress=sys.stderr if show else None)
    except OvlfsckError as exc:
        if as_json:
            report.dump_json(report.json_document(stack, pre.namespace, mode.value, None, exc.exit_code,
                                                  error=str(exc), notes=notes))
        raise
    code = result.exit_code
    if as_json:
        report.dump_json(report.json_document(stack, pre.namespace, mode.value, result, code, notes=notes))
    elif isinstance(listener, report.TextReporter):
        listener.summary(result, [], stack)
    elif listener is not None and hasattr(listener, "summary"):
        listener.summary(result)
    return code


@app.command()
@contract("ovlfsck")
def check(
    options: List[str] = typer.Option([], "-o", help="Mount options: lowerdir=A:B,upperdir=U,workdir=W (repeatable)."),
    lower: List[str] = typer.Option([], "--lower", help="A lower layer, top-most first (repeatable)."),
    upper: Optional[str] = typer.Option(None, "--upper", help="The upper layer."),
    work: Optional[str] = typer.Option(None, "--work", help="The workdir."),
    no: bool = typer.Option(False, "-n", "--no", help="Change nothing; report everything."),
    yes: bool = typer.Option(False, "-y", "--yes", help="Fix every problem that has a fix."),
    preen: bool = typer.Option(False, "-p", "-a", "--preen", help="Fix what is safe without asking."),
    repair_lowers: bool = typer.Option(False, "--repair-lowers", help="Also repair lower layers."),
    as_json: bool = typer.Option(False, "--json", help="One JSON document (schema ovlfsck/1) on stdout."),
    verbose: bool = typer.Option(False, "-v", "--verbose", help="Also show warnings, info and notes."),
    quiet: bool = typer.Option(False, "-q", "--quiet", help="Only errors and the summary."),
    severity: List[str] = typer.Option([], "--severity", help="NAME=error|warning|info|ignore (repeatable)."),
) -> int:
    """Check a layer stack and (with -y/-p or interactively) repair it."""
    return run_check(
        options, lower, upper, work, _mode(no, yes, preen), repair_lowers, as_json, verbose, quiet,
        parse_severities(severity),
    )


@app.command()
@contract("ovlfsck")
def record(
    options: List[str] = typer.Option([], "-o", help="Mount options: lowerdir=A:B,upperdir=U,workdir=W (repeatable)."),
    lower: List[str] = typer.Option([], "--lower", help="A lower layer, top-most first (repeatable)."),
    upper: Optional[str] = typer.Option(None, "--upper", help="The upper layer."),
    work: Optional[str] = typer.Option(None, "--work", help="The workdir."),
    as_json: bool = typer.Option(False, "--json", help="Print the result as JSON."),
) -> int:
    """Before copying layers: store, in the workdir, the path of every object a stored
    file handle refers to, so that a check of the copy can re-encode stale handles."""
    from ovlfsck.preflight import run_preflight
    from ovlfsck.record import record as do_record
    from ovlfsck.stack import build_stack

    stack = build_stack(options, lower, upper, work)
    if stack.work is None:
        raise UsageError("record needs the upper layer and its workdir (the record is kept in the workdir)")
    pre = run_preflight(stack, want_write=True)
    res = do_record(stack, pre)
    if as_json:
        print(json.dumps({
            "schema": "ovlfsck-record-result/1", "record": res.path, "counts": res.counts,
            "unresolved": [{"handle": e.handle.hex(), "why": e.unresolved} for e in res.unresolved],
            "warnings": list(res.warnings),
        }, indent=2))
    else:
        counts = ", ".join(f"{k} {v}" for k, v in sorted(res.counts.items()))
        print(f"ovlfsck: recorded the targets of stored handles in {res.path} ({counts})")
        for e in res.unresolved:
            print(f"ovlfsck: warning: handle {e.handle.hex()[:24]}... not resolved: {e.unresolved}")
        for w in res.warnings:
            print(f"ovlfsck: warning: {w}")
        print("ovlfsck: copy the layers with the record (it is inside the workdir); "
              "see docs/migration.md")
    return ExitCode.OK


@app.command("verify-copy")
@contract("ovlfsck")
def verify_copy_cmd(
    options: List[str] = typer.Option([], "-o", help="The ORIGINAL layers, as mount options (repeatable)."),
    lower: List[str] = typer.Option([], "--lower", help="An original lower layer (repeatable)."),
    upper: Optional[str] = typer.Option(None, "--upper", help="The original upper layer."),
    work: Optional[str] = typer.Option(None, "--work", help="The original workdir."),
    src_base: Optional[str] = typer.Option(None, "--from", help="The directory the layers were copied from..."),
    dst_base: Optional[str] = typer.Option(None, "--to", help="...and the one they were copied to (same layout below it)."),
    copy_options: List[str] = typer.Option([], "--copy-o", help="Or: the COPY's layers, as mount options."),
    as_json: bool = typer.Option(False, "--json", help="One JSON document on stdout."),
) -> int:
    """Compare a layer set with its copy for what overlay needs and copy tools lose."""
    from ovlfsck.stack import build_stack
    from ovlfsck.verify_copy import format_text, mirror_stack, verify_copy

    original = build_stack(options, lower, upper, work)
    if copy_options:
        if src_base or dst_base:
            raise UsageError("give either --from/--to or --copy-o, not both")
        copy = build_stack(copy_options)
    elif src_base and dst_base:
        copy = mirror_stack(original, src_base, dst_base)
    else:
        raise UsageError("name the copy: --from BASE --to DEST, or --copy-o lowerdir=...,upperdir=...,workdir=...")
    namespace = "user" if original.features.userxattr else "trusted"
    result = verify_copy(original, copy, namespace)
    if as_json:
        print(json.dumps({"schema": "ovlfsck-verify-copy/1", **result.as_dict()}, indent=2))
    else:
        print(format_text(result))
    return ExitCode.OK if result.ok else ExitCode.UNCORRECTED


@app.command()
@contract("ovlfsck")
def undo(
    journal: str = typer.Argument(..., help="The journal file a repair run printed."),
    dry_run: bool = typer.Option(False, "--dry-run", help="Show what would be reverted; change nothing."),
) -> int:
    """Revert the changes of one earlier run, newest first."""
    from ovlfsck.preflight import run_preflight
    from ovlfsck.repair import undo as undo_journal
    from ovlfsck.stack import stack_from_description

    if not os.path.isfile(journal):
        raise OvlfsckError(f"{journal}: no such journal file")
    try:
        with open(journal, "rb") as fh:
            header = json.loads(fh.readline())
        desc = header["stack"]["describe"]
    except (OSError, ValueError, KeyError, TypeError):
        raise OvlfsckError(f"{journal}: not an ovlfsck journal") from None
    stack = stack_from_description(desc)
    # The same refusals as a repair: layers missing, or in use by a mounted overlay.
    run_preflight(stack, want_write=not dry_run)
    report = undo_journal(journal, stack, dry_run=dry_run)
    for line in report:
        print(line)
    refused = list(getattr(report, "refused", []))
    if refused:
        print(f"ovlfsck: {len(refused)} step(s) could not be reverted (see above); "
              "the journal is kept so undo can retry them", file=sys.stderr)
        return ExitCode.OPERATIONAL
    return ExitCode.OK


@app.command()
@contract("ovlfsck")
def explain(code: str = typer.Argument(..., help="A problem code (OVL101) or name (orphan-whiteout).")) -> int:
    """Print the documentation of one problem code."""
    problem = lookup(code)
    if problem is None:
        raise UsageError(f"unknown problem {code!r} (see: ovlfsck problems)")
    print(explain_problem(problem))
    return ExitCode.OK


@app.command()
@contract("ovlfsck")
def problems(
    as_json: bool = typer.Option(False, "--json", help="The catalog as JSON."),
    as_markdown: bool = typer.Option(False, "--markdown", help="The catalog as docs/problems.md."),
) -> int:
    """List every problem code."""
    if as_json:
        print(json.dumps([
            {"code": p.code, "name": p.name, "severity": p.severity.value, "title": p.title,
             "fix": p.prompt, "preen": p.preen_ok and p.prompt is not None, "kernel": p.kernel, "doc": p.doc}
            for p in CATALOG
        ], indent=2))
    elif as_markdown:
        sys.stdout.write(markdown())
    else:
        for p in CATALOG:
            print(f"{p.code}  {p.name:32} {p.severity.value:8} {p.title}")
    return ExitCode.OK


def _version_callback(value: bool) -> None:
    if value:
        print(f"ovlfsck {__version__}")
        raise typer.Exit(0)


@app.callback()
def _main(
    version: bool = typer.Option(False, "--version", "-V", callback=_version_callback, is_eager=True,
                                 help="Print the version and exit."),
) -> None:
    """ovlfsck checks overlayfs layers before they are mounted."""


class _PlainValue:
    """typer's coercion of a parameter whose value click already gives in its final type
    (text, a list of text, a flag): the value as it is. typer >= 0.2x builds a pydantic
    TypeAdapter for every parameter it coerces, which imports pydantic and costs ~0.2 s of
    every run's start-up (`check` on an empty layer set took 0.43-0.48 s with it,
    0.25-0.29 s without); for these values the adapter only copies. Anything of another
    shape goes to typer's own coercion."""

    __slots__ = ("shape", "descriptor", "_typer")

    def __init__(self, shape: str, descriptor) -> None:
        self.shape = shape
        self.descriptor = descriptor
        self._typer = None

    def coerce(self, value, param, ctx):
        shape = self.shape
        if value is None:
            if shape == "list":
                return []
            return None
        if shape == "list":
            if isinstance(value, (list, tuple)) and all(type(v) is str for v in value):
                return list(value)
        elif type(value) is (str if shape == "text" else bool):
            return value
        if self._typer is None:
            from typer._coercion import build_runtime_param

            self._typer = build_runtime_param(self.descriptor)
        return self._typer.coerce(value, param=param, ctx=ctx)


_SHAPES = {str: "text", Optional[str]: "text", List[str]: "list", list[str]: "list",
           bool: "flag"}


def _install_plain_coercion() -> None:
    """Route typer's parameters of the _SHAPES annotations through _PlainValue. typer keeps
    the coercion in a private, lazily set `_runtime_param`; a typer without it is left as
    it is."""
    cls = getattr(getattr(typer, "core", None), "_TyperParameter", None)
    original = getattr(cls, "get_runtime_param", None)
    if original is None or getattr(original, "_ovlfsck", False):
        return

    def get_runtime_param(self):
        if getattr(self, "_runtime_param", 0) is None:
            desc = getattr(self, "type_descriptor", None)
            if desc is not None and getattr(desc, "file_annotation", None) is None:
                try:
                    shape = _SHAPES.get(desc.annotation)
                except TypeError:  # an unhashable annotation
                    shape = None
                if shape is not None:
                    self._runtime_param = _PlainValue(shape, desc)
        return original(self)

    get_runtime_param._ovlfsck = True  # type: ignore[attr-defined]
    cls.get_runtime_param = get_runtime_param


def invoke(app_obj, argv: List[str], prog: str) -> int:
    """Run a typer app; its usage-error exit (2) becomes fsck's 16."""
    try:
        _install_plain_coercion()
        app_obj(args=argv, prog_name=prog)
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else ExitCode.OPERATIONAL)
        return ExitCode.USAGE if code == 2 else code
    except KeyboardInterrupt:
        return ExitCode.CANCELLED
    return ExitCode.OK


def main(argv: Optional[List[str]] = None) -> None:
    args = list(sys.argv[1:] if argv is None else argv)
    memtune.tune()
    # `check` is the default job: `ovlfsck -n -o ...` means `ovlfsck check -n -o ...`.
    if args and args[0] not in COMMANDS and args[0] not in ("-h", "--help", "-V", "--version"):
        args.insert(0, "check")
    sys.exit(invoke(app, args, "ovlfsck"))
