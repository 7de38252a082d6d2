"""Catalog rows for index entries and the nlink xattr (OVL601 stays in problems.py) (codes OVL602-OVL699). See problems.py for the row fields."""
from __future__ import annotations

from ovlfsck.problems import Problem, Severity  # noqa: F401

ROWS: tuple[Problem, ...] = ()
