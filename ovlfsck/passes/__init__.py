"""One module per concern. Each has `check(ctx, visit)` (called for every merged directory)
and optionally `finish(ctx)` (after the walk); workdir passes have `check(ctx)`.

Passes never print, prompt, exit or write: they build Findings and call ctx.fix().
"""
from ovlfsck.passes import impure, index, opaque, redirects, whiteouts

PASSES = (whiteouts, opaque, redirects, impure)
WORKDIR_PASSES = (index,)
