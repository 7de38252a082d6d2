"""Text (e2fsck-like, path first) and JSON (schema ovlfsck/1) reporters."""
from __future__ import annotations

import json
import sys
from typing import Optional, TextIO

from ovlfsck.engine import Finding, Outcome, RunResult
from ovlfsck.fsio import display
from ovlfsck.problems import Severity
from ovlfsck.stack import Stack

SCHEMA = "ovlfsck/1"


def location(finding: Finding) -> str:
    layer = finding.layer.name if finding.layer else "stack"
    return f"{layer}:{display(finding.path) if finding.path else '.'}"


def message(finding: Finding) -> str:
    text = finding.problem.title
    if finding.detail:
        text += f" ({display(finding.detail)})"
    return text


class TextReporter:
    """One line per finding: `layer:path: what is wrong (details). Question? answer [CODE name]`.

    Errors are always shown; warnings and info only with -v. Questions in interactive
    mode are printed by the asker right after the finding line.
    """

    def __init__(self, out: Optional[TextIO] = None, verbose: bool = False, quiet: bool = False) -> None:
        self.out = out or sys.stdout
        self.verbose = verbose
        self.quiet = quiet

    def _line(self, finding: Finding, severity: Severity) -> str:
        tag = f"[{finding.problem.code} {finding.problem.name}]"
        sev = "" if severity is Severity.ERROR else f"{severity.value}: "
        return f"{location(finding)}: {sev}{message(finding)} {tag}"

    def before_question(self, finding: Finding) -> None:
        self.out.write(self._line(finding, Severity.ERROR) + "\n")
        if finding.action:
            self.out.write(f"  fix: {finding.action}\n")
        self.out.flush()

    def on_outcome(self, outcome: Outcome) -> None:
        f = outcome.finding
        if outcome.severity is not Severity.ERROR and not self.verbose and not (
            outcome.severity is Severity.INFO and outcome.fixed
        ):
            return
        if self.quiet and not outcome.counted:
            return
        if outcome.answer is None:
            suffix = "" if outcome.note is None else f" [{outcome.note}]"
            self.out.write(self._line(f, outcome.severity) + suffix + "\n")
        else:
            prompt = f.problem.prompt or "Fix"
            ans = "yes" if outcome.answer == "yes" else "no"
            text = f"{self._line(f, outcome.severity)}\n  {prompt}? {ans}"
            if outcome.fixed and f.action:
                text += f" -> {f.action}"
            if outcome.note:
                text += f" ({outcome.note})"
            self.out.write(text + "\n")
        self.out.flush()

    def summary(self, result: RunResult, notes: list[str], stack: Optional[Stack] = None) -> None:
        for note in notes:
            self.out.write(f"note: {note}\n")
        if result.features is not None and stack is not None and result.features.used:
            self.features(result.features, stack)
        for err in result.errors:
            self.out.write(f"error: {display(err)}\n")
        if result.found == 0 and not result.errors:
            self.out.write("ovlfsck: clean, no problems found.\n")
        else:
            self.out.write(
                f"ovlfsck: {result.found} problem(s) found, {result.fixed} fixed, {result.left} left.\n"
            )
        if result.journal:
            self.out.write(f"ovlfsck: changes journaled in {result.journal} (revert with: ovlfsck undo {result.journal})\n")
        self.out.flush()


    def features(self, rep, stack: Stack) -> None:
        from ovlfsck.passes.features import ORDER

        used = ", ".join(f"{name} ({rep.used[name].count})" for name in ORDER if name in rep.used)
        opts, notes = rep.mount_options(stack)
        self.out.write(f"ovlfsck: the layers use: {used}\n")
        if opts:
            self.out.write(f"ovlfsck: mount them with: -o {','.join(opts)}\n")
        for note in notes:
            self.out.write(f"ovlfsck: warning: {note}\n")
        if self.verbose:
            for name in ORDER:
                if name in rep.used:
                    self.out.write(f"  {name}: first at {display(rep.used[name].example or '')}\n")


def problem_json(outcome: Outcome) -> dict:
    f = outcome.finding
    return {
        "code": f.problem.code,
        "name": f.problem.name,
        "severity": outcome.severity.value,
        "layer": f.layer.name if f.layer else None,
        "path": display(f.path),
        "message": message(f),
        "action": f.action if f.ops else None,
        "fixed": outcome.fixed,
        **({"note": outcome.note} if outcome.note else {}),
    }


def json_document(stack: Stack, namespace: str, mode: str, result: Optional[RunResult], exit_code: int,
                  error: Optional[str] = None, notes: Optional[list[str]] = None) -> dict:
    doc = {
        "schema": SCHEMA,
        "stack": {
            "lowers": [layer.path for layer in stack.lowers] if stack else [],
            "datas": [layer.path for layer in stack.datas] if stack else [],
            "upper": stack.upper.path if stack and stack.upper else None,
            "work": stack.work.path if stack and stack.work else None,
            "xattr_namespace": namespace,
        },
        "mode": mode,
        "problems": [problem_json(o) for o in result.outcomes] if result else [],
        "counts": {
            "found": result.found if result else 0,
            "fixed": result.fixed if result else 0,
            "left": result.left if result else 0,
        },
        "journal": result.journal if result else None,
        "exit_code": exit_code,
        "notes": list(notes or []),
        "features": result.features.as_json(stack) if result and result.features is not None else None,
    }
    if error:
        doc["error"] = error
    elif result and result.errors:
        doc["error"] = "; ".join(result.errors)
    return doc


def dump_json(doc: dict, out: Optional[TextIO] = None) -> None:
    out = out or sys.stdout
    # One write: json.dump writes every token separately (~35 writes per problem).
    out.write(json.dumps(doc, indent=2, ensure_ascii=True) + "\n")
    out.flush()
