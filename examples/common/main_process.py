"""Work that happens once per run, on the main process: evaluation whose result every rank needs, exports."""
from __future__ import annotations

from typing import Any, Callable


def on_main(accelerator, fn: Callable[[], Any]) -> Any:
    """Run ``fn`` on the main process only; every process waits for it and receives its (picklable) result."""
    from accelerate.utils import broadcast_object_list

    result = [fn() if accelerator.is_main_process else None]
    accelerator.wait_for_everyone()
    if accelerator.num_processes > 1:
        broadcast_object_list(result, from_process=0)
    return result[0]
