"""work/index entry names (the rest of the index checks: issue 3)."""
from __future__ import annotations

import os

from ovlfsck import handles
from ovlfsck.engine import CheckContext, Finding
from ovlfsck.problems import BY_CODE
from ovlfsck.repair import Quarantine


def finish(ctx: CheckContext) -> None:
    work = ctx.stack.work
    if work is None:
        return
    index_dir = os.path.join(work.path, "index")
    try:
        names = sorted(os.listdir(index_dir), key=os.fsencode)
    except FileNotFoundError:
        return
    except NotADirectoryError:
        return
    except OSError as exc:
        ctx.fix(Finding(BY_CODE["OVL901"], work, "index", f"cannot list: {exc.strerror}"))
        return
    for name in names:
        if name.startswith("#"):
            continue  # temporaries: the kernel cleans them at mount
        try:
            handles.decode_index_name(name)
            continue
        except handles.HandleError as exc:
            why, err = str(exc), -22
        except handles.UnknownHandle as exc:
            why, err = str(exc), -61
        rel = f"index/{name}"
        ctx.fix(Finding(
            BY_CODE["OVL601"], work, rel,
            f"{why}; the kernel fails the mount: failed to verify index ({rel}, err={err})",
            ops=(Quarantine(work, rel),), action="move the entry to the quarantine",
        ))
