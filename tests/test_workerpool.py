"""The processes executor's worker pool: results in order, raises carried back, and no hang on stop."""

from __future__ import annotations

import os
import threading
import time

import pytest

from hetpfl.workerpool import WorkerEnded, WorkerPool


def _no_setup() -> None:
    pass


def _square(x: int) -> int:
    return x * x


def _raises_at_5(x: int) -> int:
    if x == 5:
        raise OSError("disk full")
    time.sleep(0.002 * (x % 3))  # the other pieces still under way when 5 raises
    return x


def _ends_at_3(x: int) -> int:
    if x == 3:
        os._exit(3)  # a crash: the process ends without a word
    return x


class _Unpicklable(Exception):
    def __init__(self, a: int, b: int) -> None:  # pickling rebuilds it with one argument: fails
        super().__init__(f"{a}/{b}")


def _raises_unpicklable(x: int) -> int:
    raise _Unpicklable(x, 2)


def test_map_gives_the_results_in_task_order_for_any_chunk_size():
    pool = WorkerPool(2, _no_setup)
    try:
        for chunksize in (1, 3, 50):
            assert pool.map(_square, list(range(23)), chunksize=chunksize) == [x * x for x in range(23)]
        assert pool.map(_square, []) == []
    finally:
        pool.close()


def test_a_raise_in_a_worker_is_raised_in_the_parent_with_its_traceback_and_the_pool_goes_on():
    pool = WorkerPool(2, _no_setup)
    try:
        with pytest.raises(OSError, match="disk full") as caught:
            pool.map(_raises_at_5, list(range(12)))
        assert "Traceback" in caught.value.__notes__[0] and "_raises_at_5" in caught.value.__notes__[0]
        assert pool.map(_square, [1, 2, 3]) == [1, 4, 9]  # the pipes are still in step
        with pytest.raises(RuntimeError, match="_Unpicklable: 1/2"):
            pool.map(_raises_unpicklable, [1])
    finally:
        pool.close()


def test_a_worker_that_ends_is_reported_not_waited_for():
    pool = WorkerPool(2, _no_setup)
    with pytest.raises(WorkerEnded, match="exit code 3"):
        pool.map(_ends_at_3, list(range(8)))
    with pytest.raises(RuntimeError, match="interrupted.*close it"):
        pool.map(_square, [1])
    pool.close()


def test_a_pool_stopped_mid_stage_many_times_never_hangs():
    # multiprocessing.Pool hung in this loop within 150 stops (hetpfl.workerpool's docstring says why)
    def stop_many_times() -> None:
        for _ in range(200):
            pool = WorkerPool(2, _no_setup)
            try:
                pool.map(_raises_at_5, list(range(12)), chunksize=1)
            except OSError:
                pass
            finally:
                pool.close()

    worker = threading.Thread(target=stop_many_times, daemon=True)
    worker.start()
    worker.join(timeout=120)
    assert not worker.is_alive(), "a worker pool hung while stopping"
