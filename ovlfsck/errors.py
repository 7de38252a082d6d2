"""One exception hierarchy; every error carries the fsck(8) exit code it maps to.

Only the CLI catches these and exits; everything else raises.
"""
from __future__ import annotations


class ExitCode:
    """fsck(8) exit bits (they combine with |)."""

    OK = 0
    FIXED = 1
    UNCORRECTED = 4
    OPERATIONAL = 8
    USAGE = 16
    CANCELLED = 32


class OvlfsckError(Exception):
    """Base class: one clear sentence for the user, and an exit code."""

    exit_code: int = ExitCode.OPERATIONAL


class UsageError(OvlfsckError):
    """Bad command line or option syntax."""

    exit_code = ExitCode.USAGE


class OperationalError(OvlfsckError):
    """A layer is missing/unreadable, mounted while a repair is asked, I/O error..."""

    exit_code = ExitCode.OPERATIONAL


class Cancelled(OvlfsckError):
    """The user interrupted the run (Ctrl-C) or answered 'quit'."""

    exit_code = ExitCode.CANCELLED
