"""Continuous batching for `mlxft serve`: one model thread, one running batch, requests joining and
leaving it between decode steps.

The loop, on the model thread (MLX stays on one thread; see mlxft.serve.worker):

    take what arrived (requests, and calls such as adding an adapter)
    admit waiting requests while the batch has room (--max-batch): render and encode each prompt,
        run the prompts (an engine that computes a step ahead hands the first tokens out with the
        next step; the others hand them out here)
    one decode step for every row of the batch
    hand each row's text to its connection; drop rows that finished or whose client left
    on a shared Linux CPU, fewer compute threads while other processes take cores (mlxft.cpu_share)

A backend supplies the engine (mlxft.backends.mlx.serve_batch.BatchEngine): start(requests) -> each
one's first token, or None from an engine that computes a step ahead (MLX's: the first tokens
then come with the next step); step() -> each row's next token; keep(rows), slot(adapter name),
detokenizer(), eos_ids. Text, stop strings, token counts and finish reasons are handled here, per
request, with the rules of the one-request stream() (mlx-lm's stream_generate): the
end-of-sequence token ends an answer and is not counted in it, max_tokens ends it ("length"), a
stop string ends it and is cut.
"""

from __future__ import annotations

import queue
import threading
import traceback
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass

from mlxft.generation import Piece, Sampling, StopScanner
from mlxft.serve.openai import ApiError
from mlxft.serve.worker import Admission, Job


@dataclass
class Waiting:
    job: Job
    prepare: Callable[[], list[int]]  # the prompt's ids, on the model thread (it may raise ApiError)
    sampling: Sampling
    model: str | None  # an adapter's name; None: the default


class Answer:
    """One row's answer as text: detokenized, cut at stop strings, counted."""

    def __init__(self, job: Job, detokenizer, sampling: Sampling, prompt_tokens: int, eos_ids: set[int]):
        self.job, self.detokenizer, self.eos_ids = job, detokenizer, eos_ids
        self.stops = StopScanner(sampling.stop)
        self.max_tokens, self.prompt_tokens, self.used = sampling.max_tokens, prompt_tokens, 0
        self.cached = 0  # prompt tokens the engine took from its prompt cache
        self.done = False

    def feed(self, token: int) -> None:
        if token in self.eos_ids:
            self.detokenizer.finalize()
            text = self.stops.feed(self.detokenizer.last_segment)
            return self.finish(text + self.stops.finish(), "stop")
        self.used += 1
        self.detokenizer.add_token(token)
        if self.used >= self.max_tokens:
            self.detokenizer.finalize()
            text = self.stops.feed(self.detokenizer.last_segment)
            return self.finish(text + self.stops.finish(), "stop" if self.stops.stopped else "length")
        text = self.stops.feed(self.detokenizer.last_segment)
        if self.stops.stopped:
            return self.finish(text, "stop")
        if text:
            self.job.put(Piece(text, None, self.prompt_tokens, self.used, self.cached))

    def finish(self, text: str, reason: str) -> None:
        self.job.put(Piece(text, reason, self.prompt_tokens, self.used, self.cached))
        self.job.end()
        self.done = True


class Call:
    """A function to run on the model thread between steps (adding or removing an adapter)."""

    def __init__(self, function: Callable):
        self.function, self.result, self.error, self.done = function, None, None, threading.Event()

    def run(self) -> None:
        try:
            self.result = self.function()
        except BaseException as e:  # raised again on the caller's thread
            self.error = e
        self.done.set()


class BatchScheduler:
    def __init__(self, engine, *, max_batch: int, max_queue: int, log=None, name: str = "mlxft-model", threads=None):
        self.engine = engine
        self.threads = threads  # a CpuShare (mlxft.cpu_share), asked between decode steps
        self.max_batch = max_batch
        self.admission = Admission(max_queue)
        self.log = log
        self.inbox: queue.Queue = queue.Queue()
        self.waiting: deque[Waiting] = deque()
        self.answers: list[Answer] = []  # one per row of the engine's batch, in its order
        self.thread = threading.Thread(target=self.loop, name=name, daemon=True)
        self.thread.start()

    @property
    def prompt_cache(self):
        """The engine's prompt cache (mlxft.serve.prompt_cache), or None."""
        return getattr(self.engine, "prompt_cache", None)

    # Other threads ------------------------------------------------------------------------------

    def submit(self, prepare: Callable[[], list[int]], sampling: Sampling, model: str | None) -> Job:
        """Queue a request; its Job yields the prompt's token count, then the answer's Pieces.
        ApiError 429 when --max-queue requests are already waiting."""
        self.admission.enter()
        job = Job(None)
        self.inbox.put(Waiting(job, prepare, sampling, model))
        return job

    def call(self, function: Callable, timeout: float = 600):
        """function() run on the model thread between decode steps; its result, or its error raised here."""
        call = Call(function)
        self.inbox.put(call)
        if not call.done.wait(timeout):
            raise TimeoutError("the model thread did not answer")
        if call.error is not None:
            raise call.error
        return call.result

    def adapter_names(self) -> list[str]:
        return list(self.engine.adapters.names)

    def add_adapter(self, name: str, path, default: bool = False) -> None:
        """Serve the adapter at `path` as `name` (read here, put in the batch's layers between steps)."""
        from mlxft.models.adapters import load_adapter

        spec, weights = load_adapter(path)
        self.call(lambda: self.engine.add_adapter(name, spec, weights, str(path), default=default))

    def remove_adapter(self, name: str) -> None:
        """New requests for `name` get 404 at once; answers already running with it finish."""
        self.call(lambda: self.engine.remove_adapter(name))

    def stop(self) -> None:
        self.inbox.put(None)
        self.thread.join(timeout=10)

    # The model thread ---------------------------------------------------------------------------

    def loop(self) -> None:
        while self.take(block=not self.answers and not self.waiting):
            try:
                self.admit()
                if self.answers:
                    self.advance(self.engine.step())
                if self.threads is not None:
                    self.threads.update(settle=getattr(self.engine, "settle", None))
            except Exception as e:  # a bug: every answer in flight fails with it, the server goes on
                if self.log is not None:
                    self.log(f"generation failed:\n{traceback.format_exc()}")
                for answer in self.answers:
                    answer.job.end(e)
                self.answers = []
                self.engine.clear()
        for answer in self.answers:
            answer.job.end()
        for waiting in self.waiting:
            waiting.job.end()

    def take(self, block: bool) -> bool:
        """Move what arrived into the waiting line and run calls; False once told to stop."""
        while True:
            try:
                item = self.inbox.get(block=block)
            except queue.Empty:
                return True
            block = False
            if item is None:
                return False
            if isinstance(item, Call):
                item.run()
            else:
                self.waiting.append(item)

    def admit(self) -> None:
        admitted = []
        while self.waiting and len(self.answers) + len(admitted) < self.max_batch:
            waiting = self.waiting.popleft()
            self.admission.leave()
            if waiting.job.cancelled.is_set():
                waiting.job.end()
                continue
            try:
                ids = waiting.prepare()
                slot = self.engine.slot(waiting.model)
            except KeyError:
                waiting.job.end(ApiError(404, f"the model '{waiting.model}' does not exist (it was removed)",
                                         type="not_found_error", code="model_not_found", param="model"))
                continue
            except Exception as e:
                waiting.job.end(e)
                continue
            waiting.job.put(len(ids))
            admitted.append((waiting, ids, slot))
        if not admitted:
            return
        start = len(self.answers)
        # In the list before the engine runs: should it fail, these answers fail with the others.
        self.answers += [Answer(waiting.job, self.engine.detokenizer(), waiting.sampling, len(ids), self.engine.eos_ids)
                         for waiting, ids, _ in admitted]
        firsts = self.engine.start([(ids, waiting.sampling, slot) for waiting, ids, slot in admitted])
        for answer, cached in zip(self.answers[start:], getattr(self.engine, "cached", None) or ()):
            answer.cached = cached
        if firsts is not None:
            self.advance(firsts, start=start)

    def advance(self, tokens: list[int], start: int = 0) -> None:
        """Feed each row from `start` on its token; then drop the rows that are done or abandoned."""
        for answer, token in zip(self.answers[start:], tokens):
            if not answer.job.cancelled.is_set():
                answer.feed(token)
        keep = [i for i, answer in enumerate(self.answers) if not answer.done and not answer.job.cancelled.is_set()]
        for i, answer in enumerate(self.answers):
            if not answer.done and answer.job.cancelled.is_set():
                answer.job.end()
        if len(keep) < len(self.answers):
            remember = getattr(self.engine, "remember", None)
            if remember is not None:  # answers that finished leave their keys and values in the prompt cache
                remember([i for i, answer in enumerate(self.answers) if answer.done and not answer.job.cancelled.is_set()])
            self.answers = [self.answers[i] for i in keep]
            self.engine.keep(keep)
