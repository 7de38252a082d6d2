"""Build real layer directories from a small declarative text spec (fixtures/*.spec).

Grammar, one statement per line (`#` starts a comment, blank lines ignored):

    [upper] | [lower:N] | [work] | [data:N]     the layer that the following lines build
    dir PATH [mode=0755]
    file PATH [text=WORDS...] [mode=0644]        text runs to the end of the line
    symlink PATH TARGET
    hardlink PATH EXISTING                       EXISTING is in the same layer
    whiteout PATH                                a 0/0 character device, mode 0
    fifo PATH
    xattr PATH NAME=VALUE                        NAME without namespace means <ns>.overlay.NAME;
                                                 VALUE: text, hex:ABCD, or @LAYER:PATH = the
                                                 overlay file handle of that object (for origins)

Paths are layer-relative. Parents are created as needed. Needs root for whiteouts and
trusted.* xattrs, as the kernel does.
"""
from __future__ import annotations

import os
import re
import shlex
from typing import Optional

import xattr as _xattr

from ovlfsck import handles

LAYER_DIRS = {"upper": "upper", "work": "work"}


class SpecError(ValueError):
    pass


def layer_dir(root: str, layer: str) -> str:
    if layer in LAYER_DIRS:
        return os.path.join(root, LAYER_DIRS[layer])
    kind, _, idx = layer.partition(":")
    if kind not in ("lower", "data") or not idx.isdigit():
        raise SpecError(f"unknown layer {layer!r}")
    return os.path.join(root, f"{kind}{idx}")


def _value(root: str, raw: str) -> bytes:
    if raw.startswith("hex:"):
        return bytes.fromhex(raw[4:])
    if raw.startswith("@"):
        parts = raw[1:].split(":")
        n = 1 if parts[0] in LAYER_DIRS else 2
        layer, path = ":".join(parts[:n]), ":".join(parts[n:])
        target = os.path.join(layer_dir(root, layer), path)
        base = layer_dir(root, layer)
        uuid = handles.fs_uuid(base) or handles.NULL_UUID
        return handles.encode_for(target, uuid).encode()
    return raw.encode()


def build(spec: str, root: str, namespace: str = "trusted") -> dict[str, str]:
    """Create the layers described by `spec` under `root`; returns {layer: directory}."""
    layers: dict[str, str] = {}
    current: Optional[str] = None
    os.makedirs(root, exist_ok=True)
    for lineno, line in enumerate(spec.splitlines(), 1):
        # A comment is a line starting with '#', or ' #...' after a statement ('#' inside a
        # name, like index/#12, is not one); file text runs to the end of the line.
        line = line.strip()
        if not line.startswith("file "):
            line = re.sub(r"\s+#.*$", "", line)
        if not line or line.startswith("#"):
            continue
        if line.startswith("[") and line.endswith("]"):
            current = line[1:-1].strip()
            layers[current] = layer_dir(root, current)
            os.makedirs(layers[current], exist_ok=True)
            continue
        if current is None:
            raise SpecError(f"line {lineno}: statement before any [layer] header")
        base = layers[current]
        verb, _, rest = line.partition(" ")
        try:
            _statement(root, base, verb, rest.strip(), namespace)
        except (OSError, ValueError) as exc:
            raise SpecError(f"line {lineno}: {line!r}: {exc}") from exc
    return layers


def _opts(words: list[str]) -> dict[str, str]:
    return dict(w.split("=", 1) for w in words if "=" in w)


def _statement(root: str, base: str, verb: str, rest: str, ns: str) -> None:
    if verb == "file":
        path, _, tail = rest.partition(" ")
        text = ""
        mode = 0o644
        if "text=" in tail:
            head, _, text = tail.partition("text=")
            mode = int(_opts(head.split()).get("mode", "0644"), 8)
        else:
            mode = int(_opts(tail.split()).get("mode", "0644"), 8)
        full = os.path.join(base, path)
        os.makedirs(os.path.dirname(full), exist_ok=True)
        with open(full, "w") as fh:
            fh.write(text + ("\n" if text else ""))
        os.chmod(full, mode)
        return
    words = shlex.split(rest)
    if not words:
        raise SpecError("missing path")
    full = os.path.join(base, words[0])
    if verb not in ("xattr",):
        os.makedirs(os.path.dirname(full), exist_ok=True)
    if verb == "dir":
        os.makedirs(full, exist_ok=True)
        os.chmod(full, int(_opts(words[1:]).get("mode", "0755"), 8))
    elif verb == "symlink":
        os.symlink(words[1], full)
    elif verb == "hardlink":
        os.link(os.path.join(base, words[1]), full)
    elif verb == "whiteout":
        os.mknod(full, 0o000 | 0o020000, os.makedev(0, 0))
    elif verb == "fifo":
        os.mkfifo(full)
    elif verb == "xattr":
        name, _, raw = words[1].partition("=")
        if "." not in name:
            name = f"{ns}.overlay.{name}"
        _xattr.set(full, name, _value(root, raw), nofollow=True)
    else:
        raise SpecError(f"unknown statement {verb!r}")
