"""Long Range Arena tasks: generators, readers of the released files, batching.

`lra.get_task(data_config)` returns a `Task`; lra/ knows nothing of models or attention.
"""

from lra.base import Task, ArraySource, TASKS, register_task, get_task  # noqa: F401
