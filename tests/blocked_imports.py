"""The start of a subprocess script in which some installed packages behave as if they were not installed.

`blocking_prelude(blocked)` returns Python source that wraps every finder of `sys.meta_path`, so the `blocked`
top-level packages are neither importable nor visible to `importlib.metadata` (libraries such as transformers and
sentence-transformers check for optional packages both ways), then checks that both hold. The script that follows it
can use `sys` and `BLOCKED`.
"""

from __future__ import annotations

_PRELUDE = '''
import sys

BLOCKED = {blocked!r}


class Unimportable:
    # Wraps each finder of sys.meta_path: the blocked packages are not found, as where they are not installed
    def __init__(self, finder):
        self.finder = finder

    def find_spec(self, name, path=None, target=None):
        if name.partition(".")[0] in BLOCKED:
            return None
        find_spec = getattr(self.finder, "find_spec", None)
        return find_spec(name, path, target) if find_spec else None

    def find_distributions(self, *args, **kwargs):
        # importlib.metadata sees no installed distribution of them either
        find = getattr(self.finder, "find_distributions", None)
        for distribution in find(*args, **kwargs) if find else ():
            if (distribution.metadata["Name"] or "").lower().replace("-", "_") not in BLOCKED:
                yield distribution

    def __getattr__(self, attribute):
        return getattr(self.finder, attribute)


sys.meta_path[:] = [Unimportable(finder) for finder in sys.meta_path]
from importlib.metadata import PackageNotFoundError, metadata

for name in BLOCKED:
    try:
        __import__(name)
    except ModuleNotFoundError:
        pass
    else:
        raise SystemExit(f"the import hook failed to block {{name}}")
    try:
        metadata(name)
    except PackageNotFoundError:
        pass
    else:
        raise SystemExit(f"the import hook failed to hide {{name}}'s metadata")
'''


def blocking_prelude(blocked: list[str]) -> str:
    return _PRELUDE.format(blocked=list(blocked))
