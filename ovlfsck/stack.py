"""The layer stack: mount-option parsing and the Layer / Stack model.

Options follow the kernel's own syntax (fs/overlayfs/params.c): `-o` strings are split
on `,` unless escaped with `\\`; `lowerdir=` is split on `:` unless escaped; `::` starts
the data-only layers; `lowerdir+=` / `datadir+=` append one layer each. Later values of a
key win. Feature keys are kept as hints; unknown keys are ignored (and listed, so `-v`
can say so).
"""
from __future__ import annotations

import enum
import os
from dataclasses import dataclass, field
from typing import Optional, Sequence

from ovlfsck.errors import UsageError

# OVL_MAX_STACK in the kernel.
MAX_STACK = 500


class Role(enum.Enum):
    UPPER = "upper"
    LOWER = "lower"
    DATA = "data"
    WORK = "work"


@dataclass(frozen=True)
class Layer:
    """One directory of the stack.

    `index` is the position among the lowers (0 = top-most lower) or among the data
    layers; 0 for upper and work. `path` is the absolute, symlink-resolved root.
    `depth` orders the namespace layers from the top: upper 0, then lowers 1..n when an
    upper exists (0..n-1 otherwise); it is what the walker compares.
    """

    role: Role
    index: int
    path: str
    depth: int = 0
    # "upper", "work", "lower:N", "data:N": made once (it is asked for per entry).
    name: str = field(init=False, repr=False, compare=False)
    # role is Role.UPPER (a plain attribute too: asked for per entry)
    is_upper: bool = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        name = (self.role.value if self.role in (Role.UPPER, Role.WORK)
                else f"{self.role.value}:{self.index}")
        object.__setattr__(self, "name", name)
        object.__setattr__(self, "is_upper", self.role is Role.UPPER)

    def __str__(self) -> str:  # pragma: no cover - debugging aid
        return f"{self.name}({self.path})"


_ONOFF = {"on": True, "off": False}
_CHOICES: dict[str, tuple[str, ...]] = {
    "redirect_dir": ("on", "off", "follow", "nofollow"),
    "uuid": ("on", "off", "null", "auto"),
    "xino": ("on", "off", "auto"),
    "verity": ("on", "off", "require"),
}
_BOOL_KEYS = ("index", "nfs_export", "metacopy")
_FLAG_KEYS = ("userxattr", "volatile")


@dataclass(frozen=True)
class Features:
    """Feature hints from `-o` (None: not given; the layers may still use the feature)."""

    index: Optional[bool] = None
    nfs_export: Optional[bool] = None
    metacopy: Optional[bool] = None
    redirect_dir: Optional[str] = None
    uuid: Optional[str] = None
    xino: Optional[str] = None
    verity: Optional[str] = None
    userxattr: bool = False
    volatile: bool = False

    def as_options(self) -> str:
        """The hints as a mount-option string (only the keys that were given)."""
        parts = []
        for key in _BOOL_KEYS:
            val = getattr(self, key)
            if val is not None:
                parts.append(f"{key}={'on' if val else 'off'}")
        for key in _CHOICES:
            val = getattr(self, key)
            if val is not None:
                parts.append(f"{key}={val}")
        parts.extend(key for key in _FLAG_KEYS if getattr(self, key))
        return ",".join(parts)


@dataclass(frozen=True)
class Stack:
    """The layers to check: top-most lower first; data-only layers apart."""

    lowers: tuple[Layer, ...]
    datas: tuple[Layer, ...] = ()
    upper: Optional[Layer] = None
    work: Optional[Layer] = None
    features: Features = field(default_factory=Features)
    ignored_options: tuple[str, ...] = ()

    @property
    def namespace_layers(self) -> tuple[Layer, ...]:
        """Layers that form the merged namespace, top first (upper, then lowers)."""
        return ((self.upper,) if self.upper else ()) + self.lowers

    @property
    def all_layers(self) -> tuple[Layer, ...]:
        return self.namespace_layers + self.datas + ((self.work,) if self.work else ())

    def layer_by_name(self, name: str) -> Optional[Layer]:
        for layer in self.all_layers:
            if layer.name == name:
                return layer
        return None

    def describe(self) -> dict:
        """The identity of the stack, as recorded in journals and JSON reports."""
        return {
            "lowers": [layer.path for layer in self.lowers],
            "datas": [layer.path for layer in self.datas],
            "upper": self.upper.path if self.upper else None,
            "work": self.work.path if self.work else None,
        }


# --------------------------------------------------------------------------- parsing


def split_escaped(text: str, sep: str) -> list[str]:
    """Split on `sep` where it is not escaped by a backslash; escapes are kept."""
    parts: list[str] = []
    cur: list[str] = []
    i = 0
    while i < len(text):
        ch = text[i]
        if ch == "\\" and i + 1 < len(text):
            cur.append(text[i : i + 2])
            i += 2
            continue
        if ch == sep:
            parts.append("".join(cur))
            cur = []
        else:
            cur.append(ch)
        i += 1
    parts.append("".join(cur))
    return parts


def unescape(text: str) -> str:
    """Drop the escaping backslashes (the kernel's ovl_unescape)."""
    out: list[str] = []
    i = 0
    while i < len(text):
        if text[i] == "\\" and i + 1 < len(text):
            out.append(text[i + 1])
            i += 2
        else:
            out.append(text[i])
            i += 1
    return "".join(out)


def split_lowerdir(value: str) -> tuple[list[str], list[str]]:
    """`l1:l2::d1::d2` -> (["l1", "l2"], ["d1", "d2"]), escapes resolved."""
    parts = split_escaped(value, ":")
    lowers: list[str] = []
    datas: list[str] = []
    in_data = False
    i = 0
    while i < len(parts):
        part = parts[i]
        if part == "":
            # An empty element is the second ':' of '::' (data layers follow).
            if i == 0 or i == len(parts) - 1 or in_data and parts[i - 1] == "":
                raise UsageError(f"lowerdir: empty layer path in {value!r}")
            in_data = True
            i += 1
            continue
        (datas if in_data else lowers).append(unescape(part))
        i += 1
    if not lowers:
        raise UsageError(f"lowerdir: no regular lower layer in {value!r}")
    return lowers, datas


@dataclass
class ParsedOptions:
    """What `-o` strings said, before paths are resolved."""

    lowers: list[str] = field(default_factory=list)
    datas: list[str] = field(default_factory=list)
    upper: Optional[str] = None
    work: Optional[str] = None
    features: dict = field(default_factory=dict)
    ignored: list[str] = field(default_factory=list)
    legacy_lowerdir: bool = False
    append_lowerdir: bool = False


def parse_mount_options(option_strings: Sequence[str]) -> ParsedOptions:
    """Parse one or more `-o` strings; later values of a key win."""
    parsed = ParsedOptions()
    for opts in option_strings:
        for item in split_escaped(opts, ","):
            if not item:
                continue
            key, eq, raw = item.partition("=")
            key = key.strip()
            if key == "lowerdir":
                parsed.lowers, parsed.datas = split_lowerdir(raw)
                parsed.legacy_lowerdir = True
            elif key == "lowerdir+":
                if parsed.datas:
                    raise UsageError("regular lower layers cannot follow data lower layers")
                parsed.lowers.append(unescape(raw))
                parsed.append_lowerdir = True
            elif key == "datadir+":
                parsed.datas.append(unescape(raw))
                parsed.append_lowerdir = True
            elif key == "upperdir":
                parsed.upper = unescape(raw)
            elif key == "workdir":
                parsed.work = unescape(raw)
            elif key in _BOOL_KEYS:
                if raw not in _ONOFF:
                    raise UsageError(f"invalid value for {key}: {raw!r} (expected on or off)")
                parsed.features[key] = _ONOFF[raw]
            elif key in _CHOICES:
                if raw not in _CHOICES[key]:
                    raise UsageError(
                        f"invalid value for {key}: {raw!r} (expected one of "
                        f"{', '.join(_CHOICES[key])})"
                    )
                parsed.features[key] = raw
            elif key in _FLAG_KEYS:
                if eq:
                    raise UsageError(f"option {key} takes no value")
                parsed.features[key] = True
            else:
                parsed.ignored.append(item)
        if parsed.legacy_lowerdir and parsed.append_lowerdir:
            raise UsageError("lowerdir= cannot be mixed with lowerdir+= or datadir+=")
    return parsed


def _resolve(path: str) -> str:
    if not path:
        raise UsageError("empty layer path")
    return os.path.realpath(path)


def build_stack(
    options: Sequence[str] = (),
    lowers: Sequence[str] = (),
    upper: Optional[str] = None,
    work: Optional[str] = None,
) -> Stack:
    """Build the Stack from `-o` strings and/or --lower/--upper/--work.

    --lower layers are appended after those from `-o` (top-most first); --upper and
    --work override `-o`. Paths are made absolute and symlink-resolved (the layer roots
    only; nothing inside a layer is ever followed). Existence is checked later by the
    pre-flight, which reports a missing layer as an operational error.
    """
    parsed = parse_mount_options(options)
    lower_paths = list(parsed.lowers) + list(lowers)
    upper_path = upper if upper is not None else parsed.upper
    work_path = work if work is not None else parsed.work
    if not lower_paths:
        raise UsageError("no lower layer given (use -o lowerdir=... or --lower DIR)")
    if len(lower_paths) + len(parsed.datas) > MAX_STACK:
        raise UsageError(f"too many lower layers: {len(lower_paths)}, max {MAX_STACK}")
    if upper_path and not work_path:
        raise UsageError("an upper layer needs a workdir (workdir=... or --work DIR)")
    if work_path and not upper_path:
        raise UsageError("a workdir was given without an upper layer (upperdir=... or --upper DIR)")
    depth0 = 1 if upper_path else 0
    lower_layers = tuple(
        Layer(Role.LOWER, i, _resolve(p), depth0 + i) for i, p in enumerate(lower_paths)
    )
    data_layers = tuple(
        Layer(Role.DATA, i, _resolve(p), depth0 + len(lower_layers) + i)
        for i, p in enumerate(parsed.datas)
    )
    feats = Features(**parsed.features)
    return Stack(
        lowers=lower_layers,
        datas=data_layers,
        upper=Layer(Role.UPPER, 0, _resolve(upper_path), 0) if upper_path else None,
        work=Layer(Role.WORK, 0, _resolve(work_path), -1) if work_path else None,
        features=feats,
        ignored_options=tuple(parsed.ignored),
    )


def stack_from_description(desc: dict) -> Stack:
    """The Stack a journal or report describes (`Stack.describe()`)."""
    lowers = list(desc.get("lowers") or [])
    upper = desc.get("upper")
    depth0 = 1 if upper else 0
    return Stack(
        lowers=tuple(Layer(Role.LOWER, i, p, depth0 + i) for i, p in enumerate(lowers)),
        datas=tuple(
            Layer(Role.DATA, i, p, depth0 + len(lowers) + i) for i, p in enumerate(desc.get("datas") or [])
        ),
        upper=Layer(Role.UPPER, 0, upper, 0) if upper else None,
        work=Layer(Role.WORK, 0, desc["work"], -1) if desc.get("work") else None,
    )
