"""Run one function over many tasks in worker processes, with a progress bar counting images."""

import os
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
from multiprocessing import Value

from tqdm import tqdm

_done = None  # in a worker: the images-done counter shared with the parent


def available_cpus():
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def _start_worker(counter):
    global _done
    _done = counter


def _report(count):
    with _done.get_lock():
        _done.value += count


def _call(function, task):
    return function(task, _report)


def run_tasks(function, tasks, workers, total, on_result, description="", progress=True):
    """Call `on_result(function(task, report))` for every task, in completion order.

    `function` calls `report(n)` as it finishes n images; the bar shows their count and rate.
    With more than one worker, tasks run in that many processes, each task whole in one of them.
    """
    bar = tqdm(total=total, unit="img", desc=description, disable=not progress, dynamic_ncols=True)
    try:
        if workers <= 1 or len(tasks) <= 1:
            for task in tasks:
                on_result(function(task, bar.update))
            return
        counter = Value("q", 0)
        with ProcessPoolExecutor(min(workers, len(tasks)), initializer=_start_worker,
                                 initargs=(counter,)) as pool:
            pending = {pool.submit(_call, function, task) for task in tasks}
            try:
                while pending:
                    done, pending = wait(pending, timeout=0.2, return_when=FIRST_COMPLETED)
                    bar.update(counter.value - bar.n)
                    for future in done:
                        on_result(future.result())
            except BaseException:
                pool.shutdown(wait=True, cancel_futures=True)
                raise
    finally:
        bar.close()
