"""Rehandling: the object a stale stored handle must now point to (issue 4, item 2).

After the layers were copied (another filesystem, or another directory of the same one),
every stored handle names an object of the old location. The passes that find such a
handle (origins, index) ask a `Rehandler` for its new target:

1. **the record** (`ovlfsck record`, run at the original location; `<work>/ovlfsck/record.json`
   travels with the layers): the layer and layer-relative path of every handle's object;
2. **what the passes know from paths**: the lower directory a merged directory merges with
   (its redirect followed), the lower object at a non-directory's own path, the upper alias
   of an index entry. A pass that re-encodes a handle from a path `learn()`s it, so that an
   index entry named after the old handle is renamed to the same new handle.

A target is accepted only when it exists in the expected layer, is reached without
following a symlink, and has the expected file type (the record's, and the referring
entry's). Anything else is left unresolved with the reason; nothing is guessed.
"""
from __future__ import annotations

import os
import stat
from dataclasses import dataclass
from typing import Optional

from ovlfsck import handles
from ovlfsck.fsio import kind_of_mode, quoted
from ovlfsck.record import Record, RecordError, load_record, load_record_head, record_path
from ovlfsck.repair import UnsafePathError, split_relpath
from ovlfsck.stack import Layer

FROM_RECORD = "the record"
FROM_MERGED_DIR = "the directory it merges with"
FROM_PATH = "the lower file at the same path"
FROM_ALIASES = "the lower file at its upper aliases' paths"
FROM_UPPER = "its upper alias"
FROM_ORIGINAL = "the original's path (a copy within one filesystem)"
FROM_ELIMINATION = ("elimination: the only lower hardlink named by no other handle that shows one "
                    "name and hides another, with the link count of the nlink xattr and the same "
                    "data")
FROM_DATA = ("the lower file its data lookup or redirect leads to (the kernel looks there for a "
             "metacopy file's data, and sets the redirect when it renames one)")


def fh_key(fh: handles.OvlFh) -> tuple[bytes, int, bytes]:
    """What identifies the object a handle names (flags aside)."""
    return (fh.uuid, fh.fid_type, fh.fid)


@dataclass(frozen=True)
class NewHandle:
    """The handle a stale one is to be replaced with, and where it comes from."""

    fh: handles.OvlFh
    layer: Layer
    relpath: str  # layer-relative, "" = the root
    source: str  # FROM_*
    upper_rel: Optional[str] = None  # (learned from an upper entry) its relpath in the upper

    @property
    def where(self) -> str:
        return f"{self.layer.name}:{quoted(self.relpath) if self.relpath else '(root)'}"

    def describe(self) -> str:
        return f"the handle of {self.where} ({handles.describe_fid(self.fh)}; from {self.source})"


class Rehandler:
    """Per round: the record (if any) and what the passes learned from paths."""

    def __init__(self, ctx, encode_uuid) -> None:
        """`encode_uuid(layer)`: the uuid a new handle for an object on `layer` carries
        (None: unknown, no handle can be made)."""
        self.ctx = ctx
        self.encode_uuid = encode_uuid
        self._record: Optional[Record] = None
        self._record_problem: Optional[str] = None
        self._loaded = False
        self._moved: Optional[bool] = None
        self._by_key: dict[tuple, object] = {}
        self._learned: dict[tuple, NewHandle] = {}
        self._layers = {lay.name: lay for lay in ctx.stack.all_layers}

    # ------------------------------------------------------------------ the record

    # The record is read when a handle is found stale (or `moved` cannot be told from its
    # head): a check of layers that were not copied never loads it (a record holds every
    # handle of the layers: ~75 MiB of objects for a million-entry set).

    @property
    def record(self) -> Optional[Record]:
        if not self._loaded:
            self._load()
        return self._record

    @property
    def record_problem(self) -> Optional[str]:
        if not self._loaded:
            self._load()
        return self._record_problem

    def _path(self) -> Optional[str]:
        """The record's path, if there is a regular file there (else None, and a problem
        noted when something else is there)."""
        stack = self.ctx.stack
        if stack.work is None:
            return None
        path = record_path(stack)
        if not os.path.lexists(path):
            return None
        if os.path.islink(path) or not os.path.isfile(path):
            self._record_problem = f"{path} is not a regular file: not used"
            return None
        return path

    def _load(self) -> None:
        self._loaded = True
        path = self._path()
        if path is None:
            return
        try:
            self._record = load_record(path)
        except RecordError as exc:
            self._record_problem = f"{exc}: not used"
            return
        for raw, entry in self.record.entries.items():
            try:
                fh = handles.decode(raw)
            except (handles.HandleError, handles.UnknownHandle):
                continue
            self._by_key.setdefault(fh_key(fh), entry)

    @property
    def moved(self) -> bool:
        """The record was made for these layers at other paths (copied or moved). Asked once
        per index entry: worked out once (from the record's head while the record is not
        loaded)."""
        if self._moved is None:
            self._moved = self._is_moved()
        return self._moved

    def _is_moved(self) -> bool:
        if self._loaded:
            if self._record is None:
                return False
            recorded = self._record.stack or {}
        else:
            path = self._path()
            if path is None:
                return False
            head = load_record_head(path)
            if head is None:  # not told by the head alone: the whole record decides
                self._load()
                return self._is_moved()
            recorded = head
        now = self.ctx.stack.describe()
        return bool(recorded) and recorded != now

    def recorded(self, fh: handles.OvlFh):
        """The record's entry for the object `fh` names, or None."""
        if not self._loaded:
            self._load()
        return self._by_key.get(fh_key(fh))

    def from_record(self, fh: handles.OvlFh, *, upper: bool = False, mode: Optional[int] = None,
                    below: Optional[Layer] = None) -> tuple[Optional[NewHandle], str]:
        """The new handle for `fh` from the record: (NewHandle, "") or (None, why not).

        upper: the handle names an upper object (PATH_UPPER handles); mode: the file type
        the referring entry needs; below: the target must be in a lower layer beneath it."""
        if self.record is None:
            why = "no record (run `ovlfsck record` at the original location before copying)"
            if self.record_problem:
                why = f"the record cannot be used ({self.record_problem})"
            return None, why
        entry = self.recorded(fh)
        if entry is None:
            return None, "the handle is not in the record"
        if entry.target is None:
            return None, f"the record could not resolve it either ({entry.unresolved})"
        t = entry.target
        layer = self._layers.get(t.layer)
        if layer is None:
            return None, f"the record names layer {t.layer}, which this stack does not have"
        if upper != layer.is_upper:
            return None, f"the record names {t.layer}, not {'the upper' if upper else 'a lower'} layer"
        if below is not None and not layer.is_upper and layer.depth <= below.depth:
            return None, f"the record names {t.layer}, which is not beneath {below.name}"
        rel = "" if t.path in (".", "") else t.path
        return self.at(layer, rel, mode, FROM_RECORD, upper=upper, was=t.type)

    def at(self, layer: Layer, rel: str, mode: Optional[int], source: str, upper: bool = False,
           was: Optional[str] = None) -> tuple[Optional[NewHandle], str]:
        """The new handle of the object at `rel` of `layer`, if it is there, is reached
        without a symlink and has the type `mode` (and the recorded type `was`)."""
        what = "the recorded object" if source == FROM_RECORD else "the object"
        got, why = self._lstat_in(layer, rel)
        if got is None:
            return None, f"{what} {layer.name}:{quoted(rel)} {why}"
        kind = kind_of_mode(got.st_mode).value
        if was is not None and kind != was:
            return None, (f"{what} {layer.name}:{quoted(rel)} is now of type {kind!r}, "
                          f"it was {was!r}")
        if mode is not None and stat.S_IFMT(mode) != stat.S_IFMT(got.st_mode):
            return None, (f"{what} {layer.name}:{quoted(rel)} is of type {kind!r}, "
                          f"unlike the entry that refers to it")
        new = self.encode(layer, rel, upper=upper)
        if new is None:
            return None, f"no handle can be made for {layer.name}:{quoted(rel)}"
        return NewHandle(new, layer, rel, source), ""

    def _lstat_in(self, layer: Layer, rel: str) -> tuple[Optional[os.stat_result], str]:
        """lstat of `rel` inside `layer`, every directory on the way checked not to be a
        symlink (a path from a file never leaves its layer)."""
        try:
            comps = split_relpath(rel)
        except UnsafePathError as exc:
            return None, f"is not a safe layer path ({exc})"
        path = layer.path
        for i, comp in enumerate(comps):
            path = os.path.join(path, comp)
            try:
                s = os.lstat(path)
            except OSError:
                return None, "does not exist here"
            if i < len(comps) - 1 and not stat.S_ISDIR(s.st_mode):
                return None, "is behind a non-directory (or a symlink) here"
        try:
            return os.lstat(path), ""
        except OSError:
            return None, "does not exist here"

    # ------------------------------------------------------------------ encoding

    def encode(self, layer: Layer, rel: str, upper: bool = False) -> Optional[handles.OvlFh]:
        uuid = self.encode_uuid(layer)
        if uuid is None:
            return None
        try:
            return handles.encode_for(os.path.join(layer.path, rel) if rel else layer.path, uuid,
                                      upper=upper)
        except OSError:
            return None

    def from_path(self, layer: Layer, rel: str, host_path: str, source: str,
                  upper: bool = False) -> Optional[NewHandle]:
        uuid = self.encode_uuid(layer)
        if uuid is None:
            return None
        try:
            fh = handles.encode_for(host_path, uuid, upper=upper)
        except OSError:
            return None
        return NewHandle(fh, layer, rel, source)

    # ------------------------------------------------------------------ learned

    def learn(self, old: handles.OvlFh, new: NewHandle) -> None:
        """`old` (a stale handle stored on an upper entry) is being replaced by `new`."""
        self._learned.setdefault(fh_key(old), new)

    def learned(self, old: handles.OvlFh) -> Optional[NewHandle]:
        return self._learned.get(fh_key(old))

    def targets(self) -> set[tuple[bytes, int, bytes]]:
        """What the learned new handles name (fh_key)."""
        return {fh_key(n.fh) for n in self._learned.values()}


def get(ctx, encode_uuid=None) -> Rehandler:
    """The round's Rehandler (built on first use)."""
    if encode_uuid is None:
        def encode_uuid(layer: Layer) -> Optional[bytes]:
            hint = ctx.stack.features.uuid
            if hint == "off":
                return handles.NULL_UUID
            return ctx.layer_uuid(layer)
    return ctx.round_state("rehandle", lambda: Rehandler(ctx, encode_uuid))
