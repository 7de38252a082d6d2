"""Catalog rows for origin file handles, the upper-root origin, the index dir's upper, the uuid xattr (codes OVL5xx). See problems.py for the row fields."""
from __future__ import annotations

from ovlfsck.problems import Problem, Severity  # noqa: F401

ROWS: tuple[Problem, ...] = ()
