"""Independent tasks run in-process, in local processes or on Ray: the one seam of every sweep.

    Job(run, context, setup) + items ─executor.map─▶ [Outcome(item, value | error, attempts)], in item order
        in-process (default): setup(context) once, then run(state, item) per item, one after another
        processes:  the context pickled once to a temporary file; each worker process reads it and
                    runs setup once, then takes tasks (spawned workers: nothing inherited from the driver)
        ray:        the context put in Ray's object store once (ray.put); each worker process fetches
                    it and runs setup once per sweep (the state is kept between its tasks)

Tasks are module-level functions (pickled by reference) and their results must pickle. A task
that raises is retried `retries` more times, then reported as an Outcome with its error (one
line) while the rest goes on. `progress(done, total)` is called on the driver as tasks finish.
Ctrl-C (KeyboardInterrupt) cancels what is queued or running (worker processes are stopped, Ray
tasks cancelled) and is raised again. Results do not depend on the executor: every task gets the
same context and item, and ONNX Runtime's CPU kernels give the same values at any thread count
(checked in tests/test_executor.py); each worker gets its share of the cores as ONNX Runtime
threads (spa.core.THREADS) so that workers do not oversubscribe the machine.
"""

from __future__ import annotations

import concurrent.futures as cf
import contextlib
import multiprocessing
import os
import pickle
import shutil
import signal
import socket
import tempfile
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field

import spa.core
from spa.core.errors import SpaError, UsageError, first_line

NAMES = ("in-process", "processes", "ray")
CONNECT_S = 5  # seconds to reach a Ray head before giving up
WAIT_S = 0.5  # how often the driver looks for finished Ray tasks (progress, Ctrl-C)
CANCEL_TRIES = 10  # rounds of cancelling what has not finished yet (Ctrl-C on a Ray sweep)


@dataclass(frozen=True)
class Job:
    """`run(state, item)` for each item, `state = setup(context)` once per worker (default: the
    context itself). `cpus`: cores one task uses (Ray's num_cpus; local processes: cores / cpus workers)."""

    run: Callable
    context: object = None
    setup: Callable | None = None
    cpus: int = 1

    def code(self) -> Job:
        """The job without its context: what travels with each task (the context travels once)."""
        return Job(self.run, None, self.setup, self.cpus)


@dataclass
class Outcome:
    """One task's result: `value`, or `error` (one line) after `attempts` tries. `setup`: the task's
    worker ran the job's setup first (how often the context was unpacked: at most once per worker)."""

    item: object
    value: object = None
    error: str | None = None
    attempts: int = 1
    setup: bool = False

    @property
    def ok(self) -> bool:
        return self.error is None


# ---------------------------------------------------------------- the worker side

_STATE: dict = {}  # {sweep key: state} in each worker process, for the last KEEP_STATES sweeps
KEEP_STATES = 2


def _attempt(key: str, job: Job, load: Callable, item) -> tuple:
    """Run one task here: (value, error, whether setup ran). The state of `key` is built on a
    worker's first task of the sweep (`load()` gives the context) and kept for the next ones."""
    fresh = key not in _STATE
    try:
        if fresh:
            while len(_STATE) >= KEEP_STATES:  # the oldest sweeps' (a task may run a sweep of its own)
                del _STATE[next(iter(_STATE))]
            context = load()
            _STATE[key] = job.setup(context) if job.setup is not None else context
        return job.run(_STATE[key], item), None, fresh
    except Exception as exc:  # noqa: BLE001 - any task failure is reported with the item, not raised
        what = "" if isinstance(exc, SpaError) else f"{type(exc).__name__}: "  # spa's own errors say what failed
        return None, what + first_line(exc, default="(no message)"), fresh


def _worker_init(threads: int) -> None:
    """A local worker process: Ctrl-C is the driver's to handle; ONNX Runtime gets `threads`."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    spa.core.THREADS = threads


def _ray_attempt(key: str, job: Job, box: list, item, threads: int) -> tuple:
    """On a Ray worker: the context is fetched from the object store only when this worker has
    no state for the sweep yet (`box` holds its ObjectRef, so Ray does not resolve it per task)."""
    import ray  # an extra: only on Ray workers

    spa.core.THREADS = threads
    return _attempt(key, job, lambda: ray.get(box[0]), item)


# ---------------------------------------------------------------- the driver side


@dataclass
class _Book:
    """The driver's bookkeeping of one map: outcomes by index, attempts, progress."""

    items: list
    retries: int
    progress: Callable | None
    outcomes: dict = field(default_factory=dict)
    tries: dict = field(default_factory=dict)

    def start(self) -> None:
        if self.progress is not None:
            self.progress(0, len(self.items))

    def attempt(self, i: int) -> None:
        self.tries[i] = self.tries.get(i, 0) + 1

    def finish(self, i: int, result: tuple) -> bool:
        """Record a try of task `i`; True when it is to be tried again."""
        value, error, fresh = result
        if error is not None and self.tries[i] <= self.retries:
            return True
        self.outcomes[i] = Outcome(self.items[i], value, error, self.tries[i], bool(fresh))
        if self.progress is not None:
            self.progress(len(self.outcomes), len(self.items))
        return False

    def result(self) -> list[Outcome]:
        return [self.outcomes[i] for i in range(len(self.items))]


class Executor:
    """Runs a Job over items (see the module docstring). Use as a context manager to release what
    it started (worker processes, a Ray instance it launched)."""

    name = "in-process"
    workers = 1

    def map(self, job: Job, items, *, retries: int = 1, progress=None) -> list[Outcome]:
        book = _Book(list(items), retries, progress)
        book.start()
        key = uuid.uuid4().hex
        for i in range(len(book.items)):
            again = True
            while again:
                book.attempt(i)
                again = book.finish(i, _attempt(key, job, lambda: job.context, book.items[i]))
        _STATE.pop(key, None)
        return book.result()

    def describe(self) -> str:
        return self.name

    def close(self) -> None:
        pass

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class Processes(Executor):
    """Local worker processes (spawned): `workers` (default: the cores)."""

    name = "processes"

    def __init__(self, workers: int | None = None):
        self.workers = workers or os.cpu_count() or 1

    def describe(self) -> str:
        return f"processes ({self.workers} workers)"

    def map(self, job: Job, items, *, retries: int = 1, progress=None) -> list[Outcome]:
        book = _Book(list(items), retries, progress)
        book.start()
        if not book.items:
            return []
        folder = tempfile.mkdtemp(prefix="spa-sweep-")
        workers = max(1, min(self.workers, (os.cpu_count() or 1) // max(job.cpus, 1) or 1, len(book.items)))
        threads = max(1, (os.cpu_count() or 1) // workers)
        try:
            path = os.path.join(folder, "context.pickle")
            with open(path, "wb") as f:  # once per sweep; each worker reads it once
                pickle.dump(job.context, f, protocol=pickle.HIGHEST_PROTOCOL)
            return self._run(job, book, path, workers, threads)
        finally:
            shutil.rmtree(folder, ignore_errors=True)

    def _run(self, job: Job, book: _Book, path: str, workers: int, threads: int) -> list[Outcome]:
        key, load, code = uuid.uuid4().hex, _Loader(path), job.code()
        pool, running = _pool(workers, threads), {}

        def submit(i):
            book.attempt(i)
            running[pool.submit(_attempt, key, code, load, book.items[i])] = i

        try:
            for i in range(len(book.items)):
                submit(i)
            while running:
                done, _ = cf.wait(running, return_when=cf.FIRST_COMPLETED)
                again, broken = [], False
                for fut in done:
                    i = running.pop(fut)
                    try:
                        result = fut.result()
                    except cf.process.BrokenProcessPool:
                        result, broken = (None, "a worker process died (killed, out of memory or crashed)", False), True
                    if book.finish(i, result):
                        again.append(i)
                if broken:  # a pool whose worker died fails every task: a new one, the unfinished tasks again
                    pool.shutdown(wait=False, cancel_futures=True)
                    pool = _pool(workers, threads)
                    for j in running.values():
                        book.tries[j] -= 1  # not their failure: the try is made again
                        again.append(j)
                    running.clear()
                for i in again:
                    submit(i)
            return book.result()
        except BaseException:
            _stop(pool)
            raise
        finally:
            pool.shutdown(wait=True, cancel_futures=True)


def _pool(workers: int, threads: int) -> cf.ProcessPoolExecutor:
    return cf.ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn"),
                                  initializer=_worker_init, initargs=(threads,))


@dataclass(frozen=True)
class _Loader:
    """load() of a worker: the pickled context at `path` (picklable, unlike a lambda)."""

    path: str

    def __call__(self):
        with open(self.path, "rb") as f:
            return pickle.load(f)


def _stop(pool) -> None:
    """Ctrl-C or an error on the driver: queued tasks dropped, running workers terminated."""
    workers = list((getattr(pool, "_processes", None) or {}).values())  # no public way before Python 3.14
    pool.shutdown(wait=False, cancel_futures=True)
    for p in workers:
        p.terminate()


class Ray(Executor):
    """Tasks on a Ray cluster: `address` "auto" or HOST:PORT joins one; None starts a local one
    (ray.init, `workers` CPUs) unless this process is already connected. The context goes to the
    object store once per map."""

    name = "ray"

    def __init__(self, address: str | None = None, workers: int | None = None):
        try:
            import ray
        except ImportError:
            raise SpaError("the ray executor needs Ray", "pip install 'spa[ray]'") from None
        self.ray, self.address, self.started = ray, address, False
        if not ray.is_initialized():
            _reachable(address)
            try:
                ray.init(address=address, num_cpus=workers if address is None else None, include_dashboard=False,
                         log_to_driver=False, logging_level="ERROR", configure_logging=False)
            except Exception as exc:  # noqa: BLE001 - Ray's many connection errors, as one line
                where = f"the Ray cluster at '{address}'" if address else "a local Ray instance"
                raise SpaError(f"cannot start or reach {where}: {first_line(exc)}",
                               "start one with `ray start --head`, or leave --address out") from None
            self.started = True
        self.workers = int(ray.cluster_resources().get("CPU", 1))
        self.puts = 0  # contexts put in the object store (one per map)

    def describe(self) -> str:
        return f"ray ({self.workers} CPUs{' at ' + self.address if self.address else ', local'})"

    def close(self) -> None:
        if self.started and self.ray.is_initialized():
            self.ray.shutdown()

    def map(self, job: Job, items, *, retries: int = 1, progress=None) -> list[Outcome]:
        ray = self.ray
        book = _Book(list(items), retries, progress)
        book.start()
        if not book.items:
            return []
        key, box, code = uuid.uuid4().hex, [ray.put(job.context)], job.code()
        self.puts += 1
        remote = ray.remote(_ray_attempt).options(num_cpus=job.cpus, max_retries=retries)
        threads = max(1, job.cpus)
        running = {}

        def submit(i):
            book.attempt(i)
            running[remote.remote(key, code, box, book.items[i], threads)] = i

        try:
            for i in range(len(book.items)):
                submit(i)
            while running:
                done, _ = ray.wait(list(running), num_returns=1, timeout=WAIT_S)
                for ref in done:
                    i = running.pop(ref)
                    try:
                        result = ray.get(ref)
                    except Exception as exc:  # noqa: BLE001 - a worker that died, or Ray's own failure
                        result = (None, f"{type(exc).__name__}: {first_line(exc)}", False)
                    if book.finish(i, result):
                        submit(i)
            return book.result()
        except BaseException:
            _cancel(ray, list(running))
            raise


def _cancel(ray, refs: list) -> None:
    """Cancel (force: the worker is stopped) tasks queued or running; a task being placed on a node
    while the first cancel passes may miss it, so those still unfinished are cancelled again."""
    for _ in range(CANCEL_TRIES):
        for ref in refs:
            ray.cancel(ref, force=True)
        _, refs = ray.wait(refs, num_returns=len(refs), timeout=WAIT_S * 2)
        if not refs:
            return


def _reachable(address: str | None) -> None:
    """Fail in seconds on a HOST:PORT nothing listens at (Ray itself retries for minutes)."""
    if address in (None, "auto") or address.startswith("ray://"):
        return
    host, _, port = address.rpartition(":")
    if not host or not port.isdigit():
        raise UsageError(f"invalid Ray address '{address}'", "give auto or HOST:PORT (the head's GCS port, 6379)")
    try:
        socket.create_connection((host, int(port)), timeout=CONNECT_S).close()
    except OSError as exc:
        raise SpaError(f"cannot reach the Ray cluster at '{address}': {exc.strerror or exc}",
                       "is its head running (ray start --head), and is this the GCS port?") from None


@contextlib.contextmanager
def opened(executor=None):
    """The Executor `executor` names, closed afterwards (a Ray instance it started is shut down),
    or the Executor given, as it is (its owner closes it)."""
    if isinstance(executor, Executor):
        yield executor
        return
    ex = get(executor)
    try:
        yield ex
    finally:
        ex.close()


def get(executor=None, *, workers: int | None = None, address: str | None = None) -> Executor:
    """An Executor from a name in NAMES (None: in-process) or an Executor as it is."""
    if isinstance(executor, Executor):
        return executor
    if workers is not None and workers < 1:
        raise UsageError(f"invalid workers={workers}: it must be at least 1")
    if workers is not None and executor in (None, "in-process"):
        raise UsageError("workers= is for the processes and ray executors", "choose one of them, or leave it out")
    if address is not None and executor != "ray":
        raise UsageError("address= is for the ray executor", "choose the ray executor, or leave the address out")
    if executor in (None, "in-process"):
        return Executor()
    if executor == "processes":
        return Processes(workers)
    if executor == "ray":
        return Ray(address, workers)
    raise UsageError(f"unknown executor '{executor}'", f"choose one of {', '.join(NAMES)}")
