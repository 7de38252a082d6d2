"""`ovlfsck record`: remember what every stored file handle refers to, by path.

Run at the original location, before the layers are copied. For every handle stored in
the layer set it writes the layer name and layer-relative path (and file type) of the
object the handle decodes to, into `<work>/ovlfsck/record.json`, so that the record
travels with the layers and a later `check -y` on the copy can re-encode each stale
handle exactly (issue 4, overlay-format.md §4, §9).

Handles recorded (kinds):
* `origin`          the `origin` xattr of every upper entry (the upper root's included:
                    it refers to the lower:0 root) and of lower entries that carry one;
* `index`           every `work/index` entry name (hardlink, dir and whiteout index
                    entries alike; `#` temp names are skipped);
* `index-upper`     the `upper` xattr of dir index entries (an upper directory);
* `indexdir-upper`  the `upper` xattr of `work/index` itself (the upper root).

Lower objects are found by decoding each handle with open_by_handle_at(2) on the
filesystem of the lower layers and mapping the decoded (st_dev, st_ino) back to a path
during ONE walk of the lower layers. Only the inodes some handle needs are mapped (memory
grows with the number of handles, not with the number of lower entries). Handles found on
lower entries during that walk whose target was already passed are mapped by a second,
targeted walk (only when there are any). Upper targets are mapped the same way during the
upper walk. A handle that does not decode, or decodes to nothing inside the layers, is
recorded as unresolved with the reason; nothing is guessed.

Format (JSON, plain file, relative paths only):
    {"format": "ovlfsck-record/1", "created": ISO-8601, "stack": Stack.describe(),
     "namespace": "trusted"|"user", "uuids": {layer name: uuid hex or null},
     "counts": {...},
     "handles": [{"handle": hex, "kinds": [...],
                  "sources": [{"kind", "layer", "path"|"path_hex", "type"}],
                  "target": {"layer", "path"|"path_hex", "type", "ino", "nlink"} | null,
                  "unresolved": null | "why"}]}
A path is stored as "path" when its bytes are valid UTF-8, else as "path_hex" (the hex of
its raw bytes), so every name round-trips. The layer root is ".".
"""
from __future__ import annotations

import datetime
import json
import os
import stat
import sys
import tempfile
from dataclasses import dataclass, field
from typing import Callable, Iterable, Optional

from ovlfsck import handles
from ovlfsck.errors import OperationalError, OvlfsckError
from ovlfsck.fsio import Xattrs, kind_of_mode
from ovlfsck.repair import default_state_dir
from ovlfsck.stack import Layer, Stack

FORMAT = "ovlfsck-record/1"
RECORD_NAME = "record.json"

KIND_ORIGIN = "origin"
KIND_INDEX = "index"
KIND_INDEX_UPPER = "index-upper"
KIND_INDEXDIR_UPPER = "indexdir-upper"
KINDS = (KIND_ORIGIN, KIND_INDEX, KIND_INDEX_UPPER, KIND_INDEXDIR_UPPER)


class RecordError(OvlfsckError):
    """A record file that cannot be used (other format version, damaged)."""


# --------------------------------------------------------------------------- paths


def encode_path(rel: str) -> dict:
    raw = os.fsencode(rel)
    try:
        return {"path": raw.decode("utf-8")}
    except UnicodeDecodeError:
        return {"path_hex": raw.hex()}


def decode_path(doc: dict) -> str:
    if "path_hex" in doc:
        return os.fsdecode(bytes.fromhex(doc["path_hex"]))
    return doc["path"]


def _rel(root: str, path: str) -> str:
    rel = os.path.relpath(path, root)
    return rel


# --------------------------------------------------------------------------- model


@dataclass(frozen=True, slots=True)
class Source:
    """Where a handle is stored."""

    kind: str
    layer: str
    path: str  # layer-relative ("." = root); for index entries "index/<name>" under work
    type: str  # Kind value of the entry carrying it


@dataclass(frozen=True, slots=True)
class Target:
    """The object a handle referred to when it was recorded."""

    layer: str
    path: str
    type: str
    ino: int
    nlink: int


@dataclass(slots=True)
class RecordEntry:
    handle: bytes
    kinds: list[str] = field(default_factory=list)
    sources: list[Source] = field(default_factory=list)
    target: Optional[Target] = None
    unresolved: Optional[str] = None

    def add(self, src: Source) -> None:
        self.sources.append(src)
        if src.kind not in self.kinds:
            self.kinds.append(src.kind)

    def to_json(self) -> dict:
        return {
            "handle": self.handle.hex(),
            "kinds": sorted(self.kinds),
            "sources": [
                {"kind": s.kind, "layer": s.layer, **encode_path(s.path), "type": s.type}
                for s in self.sources
            ],
            "target": None if self.target is None else {
                "layer": self.target.layer, **encode_path(self.target.path),
                "type": self.target.type, "ino": self.target.ino, "nlink": self.target.nlink,
            },
            "unresolved": self.unresolved,
        }

    @classmethod
    def from_json(cls, doc: dict) -> "RecordEntry":
        # The short words (kinds, layer names, types) repeat in every entry: one str each
        # (a record holds every handle of the layers; ~0.5 KB per entry without this).
        i = sys.intern
        t = doc.get("target")
        return cls(
            handle=bytes.fromhex(doc["handle"]),
            kinds=[i(k) for k in doc.get("kinds") or []],
            sources=[Source(i(s["kind"]), i(s["layer"]), decode_path(s), i(s.get("type", "")))
                     for s in doc.get("sources") or []],
            target=None if t is None else Target(i(t["layer"]), decode_path(t), i(t["type"]),
                                                 int(t.get("ino", 0)), int(t.get("nlink", 0))),
            unresolved=doc.get("unresolved"),
        )


@dataclass
class Record:
    """A loaded record: lookup by handle bytes."""

    path: str
    created: str
    stack: dict
    uuids: dict[str, Optional[str]]
    entries: dict[bytes, RecordEntry]
    namespace: str = "trusted"

    def lookup(self, handle: bytes) -> Optional[RecordEntry]:
        return self.entries.get(bytes(handle))

    def __len__(self) -> int:
        return len(self.entries)


@dataclass
class RecordResult:
    path: str
    counts: dict[str, int]  # per kind (handles, deduplicated), plus "resolved"/"unresolved"/"handles"
    unresolved: list[RecordEntry]
    warnings: list[str]
    entries: dict[bytes, RecordEntry]


# --------------------------------------------------------------------------- recording


class _Recorder:
    def __init__(self, stack: Stack, namespace: str) -> None:
        self.stack = stack
        self.xa = Xattrs(namespace)
        self.entries: dict[bytes, RecordEntry] = {}
        self.warnings: list[str] = []
        self.uuids: dict[str, Optional[bytes]] = {}
        self.devs: dict[str, int] = {}
        for layer in stack.all_layers:
            try:
                self.uuids[layer.name] = handles.fs_uuid(layer.path)
            except OSError:
                self.uuids[layer.name] = None
            self.devs[layer.name] = os.stat(layer.path).st_dev
        # handle bytes -> decoded key (dev, ino), for handles awaiting a path
        self.pending: dict[bytes, tuple[int, int]] = {}
        self.pending_upper: dict[bytes, tuple[int, int]] = {}

    # -- bookkeeping
    def entry(self, raw: bytes) -> RecordEntry:
        e = self.entries.get(raw)
        if e is None:
            e = self.entries[raw] = RecordEntry(raw)
        return e

    def warn(self, layer: Layer, path: str, exc: OSError) -> None:
        self.warnings.append(f"{layer.name}: {path}: {exc.strerror or exc}")

    # -- decoding
    def _parse(self, e: RecordEntry) -> Optional[handles.OvlFh]:
        try:
            return handles.decode(e.handle)
        except handles.HandleError as exc:
            e.unresolved = f"invalid handle: {exc}"
        except handles.UnknownHandle as exc:
            e.unresolved = f"unknown handle: {exc}"
        return None

    def _decode_on(self, e: RecordEntry, fh: handles.OvlFh, layers: Iterable[Layer], what: str) -> Optional[tuple[int, int]]:
        cands = [l for l in layers
                 if fh.uuid == handles.NULL_UUID or self.uuids.get(l.name) in (None, fh.uuid)]
        if not cands:
            e.unresolved = (f"uuid {handles.format_uuid(fh.uuid)} matches no {what} layer's "
                            f"filesystem")
            return None
        tried: set[int] = set()
        errors: list[str] = []
        for layer in cands:
            dev = self.devs[layer.name]
            if dev in tried:
                continue
            tried.add(dev)
            try:
                dec = handles.decode_on(layer.path, fh)
            except handles.HandleDecodeUnsupported as exc:
                errors.append(f"cannot decode on {layer.name}: {exc.strerror or exc}")
                continue
            if dec is not None:
                return dec.key
        e.unresolved = "; ".join(errors) or f"stale: names no object on the {what} filesystem ({handles.describe_fid(fh)})"
        return None

    def resolve_lower(self, e: RecordEntry) -> None:
        if e.target is not None or e.unresolved is not None or e.handle in self.pending:
            return
        fh = self._parse(e)
        if fh is None:
            return
        if fh.flags & handles.FLAG_PATH_UPPER:
            e.unresolved = "handle of an upper object where a lower origin is expected"
            return
        key = self._decode_on(e, fh, self.stack.lowers, "lower")
        if key is not None:
            self.pending[e.handle] = key

    def resolve_upper(self, e: RecordEntry) -> None:
        if e.target is not None or e.unresolved is not None or e.handle in self.pending_upper:
            return
        fh = self._parse(e)
        if fh is None:
            return
        key = self._decode_on(e, fh, [self.stack.upper], "upper")
        if key is not None:
            self.pending_upper[e.handle] = key

    # -- walking
    def walk(self, layer: Layer, visit: Callable[[str, os.stat_result], None]) -> None:
        """Every object of the layer (root first), symlinks never followed."""
        root = layer.path
        try:
            visit(".", os.lstat(root))
        except OSError as exc:
            self.warn(layer, ".", exc)
            return
        stack = [root]
        while stack:
            d = stack.pop()
            try:
                it = os.scandir(d)
            except OSError as exc:
                self.warn(layer, _rel(root, d), exc)
                continue
            with it:
                for de in it:
                    try:
                        st = de.stat(follow_symlinks=False)
                    except OSError as exc:
                        self.warn(layer, _rel(root, de.path), exc)
                        continue
                    visit(_rel(root, de.path), st)
                    if stat.S_ISDIR(st.st_mode):
                        stack.append(de.path)

    def _map(self, pending: dict[bytes, tuple[int, int]], layer: Layer, rel: str, st: os.stat_result) -> None:
        key = (st.st_dev, st.st_ino)
        if key not in self._wanted:
            return
        for raw in self._wanted.pop(key):
            e = self.entries[raw]
            if e.target is None:
                e.target = Target(layer.name, rel, kind_of_mode(st.st_mode).value, st.st_ino, st.st_nlink)
            pending.pop(raw, None)

    def _want(self, pending: dict[bytes, tuple[int, int]]) -> None:
        self._wanted: dict[tuple[int, int], list[bytes]] = {}
        for raw, key in pending.items():
            self._wanted.setdefault(key, []).append(raw)

    def run(self) -> None:
        stack = self.stack
        upper, work = stack.upper, stack.work
        index_dir = os.path.join(work.path, "index") if work is not None else None

        # 1. work/index: entry names, dir index `upper`, the index dir's `upper`.
        if index_dir is not None and os.path.isdir(index_dir) and not os.path.islink(index_dir):
            raw = self.xa.get(index_dir, "upper")
            if raw is not None:
                self.entry(raw).add(Source(KIND_INDEXDIR_UPPER, work.name, "index", "d"))
            try:
                names = sorted(os.listdir(index_dir))
            except OSError as exc:
                names = []
                self.warn(work, "index", exc)
            for name in names:
                if name.startswith("#"):
                    continue
                full = os.path.join(index_dir, name)
                try:
                    st = os.lstat(full)
                except OSError as exc:
                    self.warn(work, "index/" + name, exc)
                    continue
                typ = kind_of_mode(st.st_mode).value
                try:
                    handles.decode_index_name(name)
                except (handles.HandleError, handles.UnknownHandle) as exc:
                    # Not a handle; recorded under its name's bytes for the report.
                    e = self.entry(os.fsencode(name))
                    e.add(Source(KIND_INDEX, work.name, "index/" + name, typ))
                    e.unresolved = f"index name is not a valid handle: {exc}"
                    continue
                # decode_index_name tolerates trailing bytes; keep the name's own bytes.
                key = bytes.fromhex(name)
                self.entry(key).add(Source(KIND_INDEX, work.name, "index/" + name, typ))
                if stat.S_ISDIR(st.st_mode):
                    up = self.xa.get(full, "upper")
                    if up is not None:
                        self.entry(up).add(Source(KIND_INDEX_UPPER, work.name, "index/" + name, typ))
                elif not stat.S_ISCHR(st.st_mode):
                    # A hardlink index entry's own `origin` (normally the name's bytes).
                    org = self.xa.get(full, "origin")
                    if org is not None:
                        self.entry(org).add(Source(KIND_ORIGIN, work.name, "index/" + name, typ))

        # 2. Upper handles (index `upper`s) decode on the upper fs; the upper walk maps them
        #    and collects the upper origins.
        upper_origins: list[bytes] = []
        if upper is not None:
            for e in list(self.entries.values()):
                if KIND_INDEX_UPPER in e.kinds or KIND_INDEXDIR_UPPER in e.kinds:
                    self.resolve_upper(e)
            self._want(self.pending_upper)

            def visit_upper(rel: str, st: os.stat_result) -> None:
                self._map(self.pending_upper, upper, rel, st)
                raw = self.xa.get(os.path.join(upper.path, rel), "origin") if rel != "." else self.xa.get(upper.path, "origin")
                if raw is not None:
                    self.entry(raw).add(Source(KIND_ORIGIN, upper.name, rel, kind_of_mode(st.st_mode).value))
                    upper_origins.append(raw)

            self.walk(upper, visit_upper)
            for raw in list(self.pending_upper):
                self.entries[raw].unresolved = "decodes to an object outside the upper layer"
            self.pending_upper.clear()

        # 3. Lower handles: origins and index names, decoded now; one walk of the lowers
        #    maps them and collects (and decodes) the origins stored on lower entries.
        for e in list(self.entries.values()):
            if KIND_ORIGIN in e.kinds or KIND_INDEX in e.kinds:
                self.resolve_lower(e)
        self._want(self.pending)
        for layer in stack.lowers:
            def visit_lower(rel: str, st: os.stat_result, layer: Layer = layer) -> None:
                self._map(self.pending, layer, rel, st)
                raw = self.xa.get(os.path.join(layer.path, rel) if rel != "." else layer.path, "origin")
                if raw is not None:
                    e = self.entry(raw)
                    e.add(Source(KIND_ORIGIN, layer.name, rel, kind_of_mode(st.st_mode).value))
                    before = e.handle in self.pending
                    self.resolve_lower(e)
                    if not before and e.handle in self.pending:
                        key = self.pending[e.handle]
                        self._wanted.setdefault(key, []).append(e.handle)
            self.walk(layer, visit_lower)
        if self.pending:
            # Handles first met on lower entries whose target the walk had already passed.
            self._want(self.pending)
            for layer in stack.lowers:
                self.walk(layer, lambda rel, st, layer=layer: self._map(self.pending, layer, rel, st))
        for raw in list(self.pending):
            self.entries[raw].unresolved = "decodes to an object outside the lower layers"
        self.pending.clear()


def _counts(entries: dict[bytes, RecordEntry]) -> dict[str, int]:
    counts = {k: 0 for k in KINDS}
    counts.update(handles=len(entries), resolved=0, unresolved=0)
    for e in entries.values():
        for k in e.kinds:
            counts[k] += 1
        counts["resolved" if e.target is not None else "unresolved"] += 1
    return counts


def record_path(stack: Stack) -> str:
    return os.path.join(default_state_dir(stack), RECORD_NAME)


def record(stack: Stack, preflight, path: Optional[str] = None) -> RecordResult:
    """Record every stored handle of `stack` into `<work>/ovlfsck/record.json` (or `path`)."""
    if stack.work is None and path is None:
        raise OperationalError("record needs the workdir (the record is stored inside it, to travel with the layers)")
    rec = _Recorder(stack, preflight.namespace)
    rec.run()
    out = path or record_path(stack)
    ordered = sorted(rec.entries.values(), key=lambda e: e.handle)
    doc = {
        "format": FORMAT,
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "stack": stack.describe(),
        "namespace": preflight.namespace,
        "uuids": {name: (u.hex() if u is not None else None) for name, u in rec.uuids.items()},
        "counts": _counts(rec.entries),
        # last: load_record_head reads the part before it
        "handles": [e.to_json() for e in ordered],
    }
    write_atomic(out, json.dumps(doc, indent=1, sort_keys=False).encode() + b"\n")
    return RecordResult(
        path=out,
        counts=doc["counts"],
        unresolved=[e for e in ordered if e.target is None],
        warnings=rec.warnings,
        entries=rec.entries,
    )


def write_atomic(path: str, data: bytes) -> None:
    """temp file in the same dir, fsync, rename over `path`, fsync the dir."""
    d = os.path.dirname(os.path.abspath(path))
    os.makedirs(d, mode=0o700, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix="." + os.path.basename(path) + ".", suffix=".tmp", dir=d)
    try:
        try:
            view = memoryview(data)
            while view:
                n = os.write(fd, view)
                view = view[n:]
            os.fchmod(fd, 0o600)
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise
    dfd = os.open(d, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(dfd)
    finally:
        os.close(dfd)


_HANDLES_KEY = b'\n "handles": ['  # the last top-level key, as `record` writes it


def load_record_head(path: str, limit: int = 1 << 20) -> Optional[dict]:
    """The `stack` of a record, read from the part of the file before its handles (written
    last), so that a check of layers that were not moved need not load every handle.
    None when the head cannot tell (another layout, another format, damaged, unreadable):
    the caller then loads the whole record, with its errors."""
    try:
        with open(path, "rb") as fh:
            data = fh.read(limit)
    except OSError:
        return None
    end = data.find(_HANDLES_KEY)
    if end < 0:
        return None
    head = data[:end].rstrip()
    if not head.endswith(b","):
        return None
    try:
        doc = json.loads(head[:-1] + b"}")
    except ValueError:
        return None
    if not isinstance(doc, dict) or doc.get("format") != FORMAT:
        return None
    stack = doc.get("stack")
    return stack if isinstance(stack, dict) else None


def load_record(path: str) -> Record:
    """Read a record file; refuse other format versions and damaged files (exit 8)."""
    try:
        with open(path, "rb") as fh:
            data = fh.read()
    except OSError as exc:
        raise RecordError(f"{path}: cannot read the record: {exc.strerror}") from None
    try:
        doc = json.loads(data)
        del data
    except ValueError as exc:
        raise RecordError(f"{path}: not a valid ovlfsck record (bad JSON: {exc})") from None
    fmt = doc.get("format") if isinstance(doc, dict) else None
    if fmt != FORMAT:
        raise RecordError(
            f"{path}: unsupported record format {fmt!r} (this ovlfsck reads {FORMAT!r}); "
            "run `ovlfsck record` again with this version at the original location"
        )
    try:
        entries = {}
        handles = doc["handles"]
        if not isinstance(handles, list):
            raise TypeError("handles is not a list")
        for k, item in enumerate(handles):
            handles[k] = None  # each parsed item freed once converted: not both at the peak
            e = RecordEntry.from_json(item)
            entries[e.handle] = e
        return Record(path=path, created=doc.get("created", ""), stack=doc.get("stack") or {},
                      uuids=doc.get("uuids") or {}, entries=entries,
                      namespace=doc.get("namespace", "trusted"))
    except (KeyError, TypeError, ValueError, AttributeError) as exc:
        raise RecordError(f"{path}: damaged ovlfsck record ({exc.__class__.__name__}: {exc})") from None
