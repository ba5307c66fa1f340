"""Forked worker processes, each on a pipe of its own: the ``processes`` executor's pool.

Why not :class:`multiprocessing.pool.Pool`: its workers share one task queue and one result queue,
guarded by locks in shared memory, fed by three threads of the parent, and ``terminate`` stops
workers wherever they are (a worker waiting in a queue's ``get`` holds its lock). Runs that raised
out of a stage hung about once in eighty (measured twice: once in ``terminate``, its task thread
waiting on a queue lock no live process would release; once in the next run's first stage, waiting
for results that never came), and a bare pool stopped mid-map over and over hung within 150 stops
(``tests/test_workerpool.py``). Here each worker has a duplex pipe to the parent and nothing else,
the parent hands a piece of work only to an idle worker, and shutting down asks, waits a moment,
then terminates: nothing is shared that a stopped process could leave locked. A worker whose
process ends is reported (:class:`WorkerEnded`), not waited for.
"""

from __future__ import annotations

import multiprocessing
import pickle
import traceback
from multiprocessing.connection import wait
from typing import Any, Callable, Sequence


class WorkerEnded(RuntimeError):
    """A worker process ended while it had work (a crash, a kill)."""


def _serve(end: Any, others: list[Any], initializer: Callable[..., None], initargs: tuple) -> None:
    """A worker: run each piece of work it is sent until told to stop or the parent is gone."""
    for other in others:  # the parent's ends of the other workers' pipes: a worker must not hold them
        other.close()
    initializer(*initargs)
    while True:
        try:
            job = end.recv()
        except (EOFError, OSError):
            return  # the parent is gone
        if job is None:
            return
        function, chunk = job
        try:
            answer = ("done", [function(task) for task in chunk])
        except Exception as exc:  # noqa: BLE001  (raised again in the parent)
            try:
                pickled = pickle.dumps(exc)
            except Exception:  # noqa: BLE001  (then it travels as its text alone)
                pickled = b""
            answer = ("raised", pickled, f"{type(exc).__name__}: {exc}", traceback.format_exc())
        end.send(answer)


def _raised(pickled: bytes, text: str) -> BaseException:
    """A worker's exception as it was, or a RuntimeError with its text where it cannot be rebuilt."""
    try:
        return pickle.loads(pickled)  # noqa: S301  (bytes from this run's own worker)
    except Exception:  # noqa: BLE001
        return RuntimeError(text)


class WorkerPool:
    """``workers`` forked processes; :meth:`map` runs a function over tasks, results in task order."""

    def __init__(self, workers: int, initializer: Callable[..., None], initargs: tuple = ()) -> None:
        context = multiprocessing.get_context("fork")
        self._workers: list[tuple[Any, Any]] = []  # (process, the parent's end of its pipe)
        for _ in range(workers):
            parent_end, worker_end = context.Pipe()
            others = [end for _, end in self._workers] + [parent_end]
            process = context.Process(target=_serve, args=(worker_end, others, initializer, initargs), daemon=True)
            process.start()
            worker_end.close()
            self._workers.append((process, parent_end))
        self._in_step = True  # every worker idle, its pipe empty: false after an interrupted map

    def map(self, function: Callable[[Any], Any], tasks: Sequence[Any], chunksize: int = 1) -> list[Any]:
        """``[function(task) for task in tasks]`` over the workers, ``chunksize`` tasks a piece. A
        piece that raises stops new pieces from being handed out; the pieces under way finish, then
        the first raise (in task order) is raised here with the worker's traceback as a note."""
        if not self._in_step:
            raise RuntimeError("the worker pool was interrupted in an earlier map; close it")
        chunks = [list(tasks[i : i + chunksize]) for i in range(0, len(tasks), chunksize)]
        results: list[list[Any] | None] = [None] * len(chunks)
        raised: dict[int, tuple[BaseException, str]] = {}
        busy: dict[Any, tuple[int, Any]] = {}  # the parent's end -> (chunk index, process)
        idle = list(self._workers)
        following = 0
        self._in_step = False
        while busy or (following < len(chunks) and not raised):
            while idle and following < len(chunks) and not raised:
                process, end = idle.pop()
                try:
                    end.send((function, chunks[following]))
                except (OSError, ValueError):
                    raise _ended(process, "before it was sent work") from None
                busy[end] = (following, process)
                following += 1
            for end in wait(list(busy)):
                index, process = busy.pop(end)
                try:
                    answer = end.recv()
                except (EOFError, OSError):
                    raise _ended(process, "while it had work") from None
                if answer[0] == "done":
                    results[index] = answer[1]
                else:
                    raised[index] = (_raised(answer[1], answer[2]), answer[3])
                idle.append((process, end))
        self._in_step = True
        if raised:
            exc, trace = raised[min(raised)]
            exc.add_note(f"in a worker process:\n{trace}")
            raise exc
        return [result for chunk in results for result in chunk]

    def close(self) -> None:
        """Ask every worker to stop; terminate one that has not within a few seconds (it may be
        mid-task after an interrupted map)."""
        if self._in_step:
            for _, end in self._workers:
                try:
                    end.send(None)
                except (OSError, ValueError):
                    pass
        for process, end in self._workers:
            stop_process(process, grace=5 if self._in_step else 0)
            end.close()
        self._workers = []


def _ended(process: Any, when: str) -> WorkerEnded:
    process.join(timeout=1)
    return WorkerEnded(f"a worker process ended (exit code {process.exitcode}) {when}")


def stop_process(process: Any, grace: float) -> None:
    """Wait up to ``grace`` seconds for a process to end by itself, then terminate it (kill it
    if it still lives): no caller ever waits on a process without a limit."""
    process.join(timeout=grace)
    if process.is_alive():
        process.terminate()
        process.join(timeout=5)
    if process.is_alive():
        process.kill()
        process.join()
