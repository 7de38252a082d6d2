"""Catalog rows for metacopy, data-only layers, verity digests, protattr (codes OVL8xx). See problems.py for the row fields."""
from __future__ import annotations

from ovlfsck.problems import Problem, Severity  # noqa: F401

ROWS: tuple[Problem, ...] = ()
