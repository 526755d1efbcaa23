"""The Prefect flows of distill; each body reads as its DAG, one line per stage (the work is in ``tasks``).

``flows``, ``tasks`` and ``distill`` are three top-level packages installed side by side
(README "Layout" says why). A folder of the same name earlier on ``sys.path`` (a project of
your own with a ``tasks/__init__.py``, run from its folder) would hide distill's: that is
refused here with the path that hides it, instead of a ModuleNotFoundError deep inside a run.
"""

import importlib.util as _util
from pathlib import Path as _Path

_HOME = _Path(__file__).resolve().parent.parent
for _name in ("tasks", "distill"):
    _spec = _util.find_spec(_name)
    _where = _Path(_spec.origin).resolve() if _spec is not None and _spec.origin else None
    if _where is None or _where.parent.parent != _HOME:
        raise ImportError(
            f"distill's {_name!r} package is hidden by {_where or 'a namespace folder'}: distill installs "
            f"'flows', 'tasks' and 'distill' side by side in {_HOME}; run from another folder or rename "
            f"yours"
        )
