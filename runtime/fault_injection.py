"""A crash on purpose, for the tests and benchmarks that kill a run and resume it.

``TUNEFILE_FAULT_AFTER_STEP=N`` makes a training process end abruptly right after step N is logged and
saved: no cleanup, no final save, what a SIGKILL or a lost node leaves behind. The trainer only calls the
hook it is given; __main__ builds it from the environment, so the production step holds no test code.
"""

from __future__ import annotations

import os
from collections.abc import Callable

FAULT_AFTER_STEP = "TUNEFILE_FAULT_AFTER_STEP"
FAULT_EXIT_CODE = 17


def fault_hook_from_environment() -> Callable[[int], None] | None:
    value = os.environ.get(FAULT_AFTER_STEP)
    if value is None:
        return None
    fault_step = int(value)

    def die_after(step: int) -> None:
        if step == fault_step:
            os._exit(FAULT_EXIT_CODE)

    return die_after
