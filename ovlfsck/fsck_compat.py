"""`fsck.overlay`: the hisilicon/overlayfs-progs command line on the ovlfsck engine.

Same argv grammar (`-o OPTS` repeatable, `-p/-a`, `-n`, `-y`, `-v`, `-h`, `-V`), same
problem lines (`Orphan whiteout: "x" in upperdir Remove? y`), closing lines and exit codes
(4 replaces 1 when something is left, as fsck_exit() does). This is what fsck(8) and the
xfstests harness call. Lower layers are repaired too, as the old tool did.
"""
from __future__ import annotations

import sys
from typing import List, Optional, TextIO

from ovlfsck import __version__
from ovlfsck.errors import Cancelled, ExitCode, OvlfsckError, UsageError
from ovlfsck.fsio import display

PROG = "fsck.overlay"
USAGE = f"""Usage:
\t{PROG} [-o lowerdir=<lowers>,upperdir=<upper>,workdir=<work>] [-pnyvhV]

Options:
-o,                       specify underlying directories of overlayfs:
                          multiple lower directories use ':' as separator
-p,                       automatic repair (no questions)
-n,                       make no changes to the filesystem
-y,                       assume "yes" to all questions
-v, --verbose             print more messages of overlayfs
-h, --help                display this usage of overlayfs
-V, --version             display version information
"""


def layer_label(layer) -> str:
    if layer is None:
        return "overlay"
    if layer.role.value == "upper":
        return "upperdir"
    if layer.role.value == "work":
        return "workdir"
    return f"lowerdir-{layer.index}" if layer.role.value == "lower" else f"datadir-{layer.index}"


class CompatReporter:
    """Prints problems the way fsck.overlay does: description, path, layer, question, answer."""

    def __init__(self, out: TextIO, verbose: bool) -> None:
        self.out = out
        self.verbose = verbose
        self.changed = False
        self.asked: set = set()

    def _desc(self, finding):
        p = finding.problem
        if finding.compat:
            return finding.compat
        if p.compat:
            return p.compat
        return (p.title[0].upper() + p.title[1:], p.prompt or "Fix")

    def before_question(self, finding) -> None:
        desc, question = self._desc(finding)
        self.asked.add(finding.key)
        self.out.write(f'{desc}: "{_path(finding.path)}" in {layer_label(finding.layer)} ')
        self.out.flush()

    def on_outcome(self, outcome) -> None:
        from ovlfsck.problems import Severity

        f = outcome.finding
        if outcome.fixed:
            self.changed = True
        if f.key in self.asked:
            return  # the question and its answer are already on the screen
        if outcome.severity is not Severity.ERROR and outcome.answer is None and not self.verbose:
            return
        desc, question = self._desc(f)
        where = f'{desc}: "{_path(f.path)}" in {layer_label(f.layer)}'
        if outcome.answer is None:
            self.out.write(where + "\n")
        else:
            ans = "y" if outcome.answer == "yes" else "n"
            self.out.write(f"{where} {question}? {ans}\n" if question else f"{where} ? {ans}\n")
        if self.verbose and f.detail:
            self.out.write(f"  ({display(f.detail)}) [{f.problem.code} {f.problem.name}]\n")
        self.out.flush()


def _path(path: str) -> str:
    """Layer-relative path as fsck.overlay prints it (the root is '.')."""
    return display(path) if path else "."


def parse_argv(argv: List[str]):
    """getopt("o:apnyvhV") plus --verbose/--help/--version, as the old tool."""
    opts: list[str] = []
    flags: set[str] = set()
    i = 0
    while i < len(argv):
        arg = argv[i]
        if arg in ("--verbose", "--help", "--version"):
            flags.add({"--verbose": "v", "--help": "h", "--version": "V"}[arg])
        elif arg.startswith("-") and len(arg) > 1 and not arg.startswith("--"):
            j = 1
            while j < len(arg):
                ch = arg[j]
                if ch == "o":
                    rest = arg[j + 1 :]
                    if not rest:
                        i += 1
                        if i >= len(argv):
                            raise UsageError("option requires an argument -- 'o'")
                        rest = argv[i]
                    opts.append(rest)
                    break
                if ch not in "apnyvhV":
                    raise UsageError(f"invalid option -- '{ch}'")
                flags.add("p" if ch == "a" else ch)
                j += 1
        else:
            raise UsageError(f"unexpected argument {arg!r}")
        i += 1
    return opts, flags


def main(argv: Optional[List[str]] = None) -> None:
    from ovlfsck import memtune

    memtune.tune()
    sys.exit(run(list(sys.argv[1:] if argv is None else argv)))


def run(argv: List[str]) -> int:
    from ovlfsck.cli import run_check
    from ovlfsck.engine import Mode
    from ovlfsck.stack import parse_mount_options

    out = sys.stdout
    try:
        opts, flags = parse_argv(argv)
    except UsageError as exc:
        print(f"{PROG}: {exc}", file=sys.stderr)
        print(USAGE, file=sys.stderr)
        return ExitCode.USAGE
    if "V" in flags:
        print(f"Overlay utilities version ovlfsck {__version__}")
        return ExitCode.OK
    if "h" in flags:
        print(USAGE, file=sys.stderr)
        return ExitCode.USAGE
    if len(flags & {"p", "n", "y"}) > 1:
        print("Only one of the options -p/-a, -n or -y can be specified!", file=sys.stderr)
        print(USAGE, file=sys.stderr)
        return ExitCode.USAGE
    try:
        parsed = parse_mount_options(opts)
    except UsageError as exc:
        print(f"{PROG}:[Error]: {exc}", file=sys.stderr)
        return ExitCode.USAGE
    if not parsed.lowers or (len(parsed.lowers) < 2 and not parsed.upper):
        print("Please specify correct lowerdirs and upperdir!", file=sys.stderr)
        print(USAGE, file=sys.stderr)
        return ExitCode.USAGE
    if parsed.upper and not parsed.work:
        print("Please specify correct workdir!", file=sys.stderr)
        print(USAGE, file=sys.stderr)
        return ExitCode.USAGE
    mode = Mode.PREEN if "p" in flags else Mode.NO if "n" in flags else Mode.YES if "y" in flags else Mode.ASK
    verbose = "v" in flags
    reporter: dict = {}

    def factory(stream):
        reporter["r"] = CompatReporter(out, verbose)
        return reporter["r"]

    # fsck.overlay asks on stdin whether or not it is a terminal; end of input means the
    # default answer (so `< /dev/null` behaves like -p).
    asker = _CompatAsker(out) if mode is Mode.ASK else None
    try:
        code = run_check(opts, [], None, None, mode, True, False, verbose, False,
                         listener_factory=factory, asker=asker)
    except Cancelled as exc:
        print(f"{PROG}: {exc}", file=sys.stderr)
        return ExitCode.CANCELLED
    except KeyboardInterrupt:
        return ExitCode.CANCELLED
    except OvlfsckError as exc:
        print(f"{PROG}:[Error]: {exc}", file=sys.stderr)
        print("Cannot continue, aborting!", file=out)
        print("Filesystem check failed, may not clean!", file=out)
        return exc.exit_code
    # fsck_exit(): an inconsistency left clears the "changed" bit.
    if code & ExitCode.UNCORRECTED:
        code &= ~ExitCode.FIXED
    if reporter.get("r") is not None and reporter["r"].changed:
        print("File system was modified!", file=out)
    if code & ExitCode.UNCORRECTED:
        print("Still have unexpected inconsistency!", file=out)
    if code & ExitCode.OPERATIONAL:
        print("Cannot continue, aborting!", file=out)
        print("Filesystem check failed, may not clean!", file=out)
    if not code & (ExitCode.UNCORRECTED | ExitCode.OPERATIONAL):
        print("Filesystem clean", file=out)
    return code


class _CompatAsker:
    """`<Question> ? [y]: ` on stdout, one line from stdin; empty or EOF = the default."""

    def __init__(self, out: TextIO) -> None:
        self.out = out

    def ask(self, finding, default: bool) -> bool:
        compat = finding.compat or finding.problem.compat
        question = compat[1] if compat else (finding.problem.prompt or "Fix")
        while True:
            self.out.write(f"{question + ' ' if question else ''}? [{'y' if default else 'n'}]: \n")
            self.out.flush()
            line = sys.stdin.readline()
            ans = line.strip().lower()
            if not line or ans == "":
                return default
            if ans in ("y", "yes"):
                return True
            if ans in ("n", "no"):
                return False
            self.out.write("Illegal answer. Please input y/n or yes/no:")
