"""The scenario registry shared by the per-area scenario definition modules (defs_*.py).

A definition module builds `Scenario` objects and registers them with `@scenario()`;
test_codes.py imports every defs module and runs each registered scenario.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional

from ovlfsck.problems import BY_CODE, CATALOG, Severity

from .helpers import Bed

FIXABLE = [p.code for p in CATALOG if p.prompt is not None]
DIR_0755 = ("d", 0o755, 0, 0, 0, None, None)  # merged_view entry of a fresh empty root-owned dir

# Every scenario uses names containing "zq", so kernel log lines about them can be told
# from those of other overlays mounted concurrently on this machine.
TOKEN = "zq"


@dataclass
class Scenario:
    code: str
    build: Callable[[Bed], None]  # lower layers offline, then operations through a mount
    damage: Callable[[Bed], None]  # offline, on the layer directories
    layer: str  # where (a) must report the code
    path: str
    options: str = ""
    nlowers: int = 1
    fix_args: tuple[str, ...] = ()  # e.g. --repair-lowers
    expect: Optional[Callable[[dict], dict]] = None  # view transform, when the fix changes it
    kernel_sig: tuple[str, ...] = ()  # regexes of the dmesg lines the damage makes the kernel log
    reported_as: Optional[str] = None  # the code -n reports (OVL311: the redirect problem)

    @property
    def severity_args(self) -> list[str]:
        codes = {self.code, self.reported_as or self.code}
        return [a for c in sorted(codes) if BY_CODE[c].severity is not Severity.ERROR
                for a in ("--severity", f"{c}=error")]


SCENARIOS: dict[str, Scenario] = {}


def scenario(**kw):
    def register(fn):
        sc = fn()
        for k, v in kw.items():
            setattr(sc, k, v)
        SCENARIOS[sc.code] = sc
        return fn
    return register


def drop_under(prefix: str, keep: tuple[str, ...] = ()) -> Callable[[dict], dict]:
    """A view without the children of `prefix` (except `keep`): a directory that stops merging."""
    def tf(view: dict) -> dict:
        return {k: v for k, v in view.items() if not k.startswith(prefix + "/") or k in keep}
    return tf


def add_dir(path: str) -> Callable[[dict], dict]:
    def tf(view: dict) -> dict:
        return {**view, path: DIR_0755}
    return tf


