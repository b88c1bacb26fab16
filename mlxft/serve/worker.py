"""The one thread that runs the model for `mlxft serve`, for a generator that answers one
request at a time (its `stream()` only; mlxft.serve.scheduler runs the ones that can batch).

Connections come and go on threads of their own, but none of them touches the model: MLX keeps
resources per calling thread (streams, caches) that outlive the thread, so a thread per request
leaked two OS threads and ~0.3 MB each. Every generation runs here instead, one at a time in
arrival order, and hands its pieces back through a queue; a request whose client leaves is
cancelled between tokens.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Callable, Iterator

from mlxft.errors import UserError

_END = object()


class Job:
    """One generation: iterate it on the connection's thread to get its items as they come."""

    def __init__(self, produce: Callable[[threading.Event], Iterator]):
        self.produce = produce
        self.cancelled = threading.Event()
        self.items: queue.Queue = queue.Queue()

    def run(self) -> None:
        try:
            items = self.produce(self.cancelled)
            try:
                for item in items:
                    self.items.put((item, None))
                    if self.cancelled.is_set():
                        break
            finally:
                close = getattr(items, "close", None)
                if close is not None:
                    close()
            self.items.put((_END, None))
        except BaseException as e:  # raised again on the connection's thread, where it is answered
            self.items.put((_END, e))

    def put(self, item) -> None:
        self.items.put((item, None))

    def end(self, error: BaseException | None = None) -> None:
        self.items.put((_END, error))

    def cancel(self) -> None:
        self.cancelled.set()

    def has_more(self) -> bool:
        """Whether an item is already waiting (the reader may hold its output back for it)."""
        return not self.items.empty()

    def __iter__(self):
        while True:
            item, error = self.items.get()
            if error is not None:
                raise error
            if item is _END:
                return
            yield item


class ModelWorker:
    def __init__(self, name: str = "mlxft-model", started: Callable[[Job], None] | None = None,
                 between: Callable[[], None] | None = None):
        self.started = started  # told of each job as it leaves the queue, run or skipped
        self.between = between  # called before each job, when no generation runs
        self.jobs: queue.Queue = queue.Queue()
        self.thread = threading.Thread(target=self._loop, name=name, daemon=True)
        self.thread.start()

    def submit(self, produce: Callable[[threading.Event], Iterator]) -> Job:
        """Queue `produce(cancelled)`, a generator function run on the model's thread."""
        job = Job(produce)
        self.jobs.put(job)
        return job

    def stop(self) -> None:
        self.jobs.put(None)
        self.thread.join(timeout=10)

    def _loop(self) -> None:
        while True:
            job = self.jobs.get()
            if job is None:
                return
            if self.between is not None:
                self.between()
            if self.started is not None:
                self.started(job)
            if not job.cancelled.is_set():
                job.run()
            else:
                job.items.put((_END, None))


class Admission:
    """Counts the requests waiting for the model and refuses one past `limit` (HTTP 429, in
    OpenAI's words), so a flood of clients gets a quick answer instead of an ever longer wait."""

    def __init__(self, limit: int):
        self.limit = limit
        self.waiting = 0
        self.lock = threading.Lock()

    def enter(self) -> None:
        from mlxft.serve.openai import ApiError

        with self.lock:
            if self.waiting >= self.limit:
                raise ApiError(429, f"the server is busy: {self.limit} requests are already waiting; retry shortly",
                               type="requests", code="rate_limit_exceeded", headers={"Retry-After": "1"})
            self.waiting += 1

    def leave(self) -> None:
        with self.lock:
            self.waiting -= 1


class SerialScheduler:
    """Requests answered one at a time with `generator.stream()`, at most `max_queue` waiting."""

    def __init__(self, generator, max_queue: int, threads=None):
        self.generator = generator
        self.admission = Admission(max_queue)
        # threads: a CpuShare (mlxft.cpu_share), asked between answers
        self.worker = ModelWorker(started=lambda job: self.admission.leave(), between=threads and threads.update)

    def submit(self, prepare: Callable[[], list[int]], sampling, model: str | None) -> Job:
        """`model` is None here: this scheduler serves the one model it was given."""
        def produce(cancelled):
            ids = prepare()
            yield len(ids)
            if not cancelled.is_set():
                yield from self.generator.stream(ids, sampling)

        self.admission.enter()
        return self.worker.submit(produce)

    def adapter_names(self) -> list[str]:
        return []

    def add_adapter(self, name: str, path=None, default: bool = False) -> None:
        raise UserError("this model is served one request at a time (its backend has no batching), with no adapters by name")

    remove_adapter = add_adapter

    def stop(self) -> None:
        self.worker.stop()
