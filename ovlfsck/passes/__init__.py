"""One module per concern, run in this order. A module may define

- `check(ctx, visit)`: called for every merged directory of the walk;
- `finish(ctx)`: called once after the walk (global checks, the workdir and the index).

Passes never print, prompt, exit or write: they build Findings and call ctx.fix().
"""
from ovlfsck.passes import (
    features, impure, index, metacopy, opaque, origins, redirects, whiteouts, workdir,
)

PASSES = (whiteouts, opaque, redirects, impure, origins, metacopy, index, workdir, features)
