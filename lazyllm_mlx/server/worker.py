"""The server's one generation thread: requests queue for it, their output queues back.

Connection threads never run the model and never hold its lock while they write: a client that
stops reading stalls only its own connection, and MLX keeps the per-thread state of one thread
only (a thread per request left two OS threads behind each time). A job's `cancel()` — its client
left, or a write timed out — stops the generation at its next prefill chunk or token.
"""

from __future__ import annotations

import logging
import queue
import threading
from dataclasses import dataclass, field
from typing import Any

from .protocol import CompletionRequest, RequestError
from .service import GenerationService

_log = logging.getLogger("lazyllm_mlx.server")


class Cancelled(Exception):
    """Raised inside the prefill when the job's client is gone."""


@dataclass(eq=False)
class Job:
    """One request on its way through the worker. `events` yields, in order:
    ("progress", done, total)*, then ("text", text, logprobs)*, then ("finish", Finish, logprobs)
    or ("cancelled",) or ("error", RequestError)."""

    request: CompletionRequest
    tokens: list[int]
    events: queue.Queue = field(default_factory=queue.Queue)
    cancelled: threading.Event = field(default_factory=threading.Event)

    def cancel(self) -> None:
        self.cancelled.set()


class GenerationWorker:
    """A daemon thread that runs the jobs of one GenerationService, one at a time."""

    def __init__(self, service: GenerationService) -> None:
        self.service = service
        self.jobs: queue.Queue[Job | None] = queue.Queue()
        self.thread = threading.Thread(target=self._run, name="lazyllm-generation", daemon=True)
        self.thread.start()

    def submit(self, request: CompletionRequest, tokens: list[int]) -> Job:
        job = Job(request, tokens)
        self.jobs.put(job)
        return job

    def stop(self) -> None:
        self.jobs.put(None)
        self.thread.join(timeout=10)

    def _run(self) -> None:
        while (job := self.jobs.get()) is not None:
            if job.cancelled.is_set():
                job.events.put(("cancelled",))
                continue
            try:
                self._serve(job)
            except Cancelled:
                job.events.put(("cancelled",))
            except RequestError as error:
                job.events.put(("error", error))
            except Exception as error:  # noqa: BLE001  (one failed request must not stop the server)
                _log.exception("generation failed")
                job.events.put(
                    ("error", RequestError(f"Internal error: {error}", 500, "server_error"))
                )

    def _serve(self, job: Job) -> None:
        def progress(done: int, total: int) -> None:
            if job.cancelled.is_set():
                raise Cancelled  # between prefill chunks: the cache is dropped, not kept
            job.events.put(("progress", done, total))

        stop = job.cancelled.is_set
        with self.service.start(job.request, job.tokens, progress, stop) as generation:
            for text in generation:
                job.events.put(("text", text, generation.take_logprobs()))
            finish, logprobs = generation.finish, generation.take_logprobs()
        # after the `with`: the prompt cache is back in place before the client hears the end
        job.events.put(("finish", finish, logprobs))


def wait_event(job: Job, seconds: float) -> tuple[Any, ...] | None:
    """The job's next event, or None after `seconds`."""
    try:
        return job.events.get(timeout=seconds)
    except queue.Empty:
        return None
