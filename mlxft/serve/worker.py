"""The one thread that runs the model for `mlxft serve`.

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

    def cancel(self) -> None:
        self.cancelled.set()

    def __iter__(self):
        while True:
            item, error = self.items.get()
            if error is not None:
                raise error
            if item is _END:
                return
            yield item


class ModelWorker:
    def __init__(self, name: str = "mlxft-model"):
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
            if not job.cancelled.is_set():
                job.run()
            else:
                job.items.put((_END, None))
