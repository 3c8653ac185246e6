"""Long Range Arena tasks: generators, readers of the released files, batching.

`lra.get_task(data_config)` returns a `Task`; lra/ knows nothing of models or attention.
Every module of this package that is not private (`_name`) or one of the shared pieces below
is a task module and registers its task(s) with `@register_task` when imported here: a new
task is registered by its file existing (plus its configs/<task>.py).
"""

import importlib
import pkgutil

from lra.base import Task, ArraySource, TASKS, register_task, get_task  # noqa: F401

_SHARED = {"base", "pipeline"}   # not task modules


def _import_task_modules():
    for info in pkgutil.iter_modules(__path__):
        if not info.name.startswith("_") and info.name not in _SHARED:
            importlib.import_module(f"{__name__}.{info.name}")


_import_task_modules()
