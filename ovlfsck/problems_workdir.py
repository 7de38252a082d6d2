"""Catalog rows for the workdir: work/work leftovers, temporaries, incompat/volatile (codes OVL7xx). See problems.py for the row fields."""
from __future__ import annotations

from ovlfsck.problems import Problem, Severity  # noqa: F401

ROWS: tuple[Problem, ...] = ()
