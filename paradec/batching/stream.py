"""asyncio access to a ``BatchEngine``: ``async for output in engine.generate(prompt, ...)``
streams one request's progress and ends with its result, while the engine steps every request
together in a worker thread (vLLM's ``AsyncLLMEngine`` shape, so another serving stack can
drive paradec without its ZeroMQ frontend).

The engine steps in one background task, only while requests are live, each step in a thread
(``asyncio.to_thread``) so the event loop stays free; ``add`` and ``abort`` take the same lock as
a step, so they land between steps. A consumer that stops iterating (``break``, cancellation)
aborts its request, freeing its row.
"""

from __future__ import annotations

import asyncio
import itertools
import threading
from collections.abc import AsyncIterator

from paradec.batching.engine import BatchEngine, RequestOutput

_IDS = itertools.count()


class AsyncBatchEngine:
    """Wraps ``engine``; use from one event loop."""

    def __init__(self, engine: BatchEngine):
        self.engine = engine
        self._lock = threading.Lock()
        self._queues: dict[str, asyncio.Queue[RequestOutput | BaseException]] = {}
        self._stepper: asyncio.Task | None = None

    async def generate(self, prompt, config=None, *, request_id: str | None = None,
                       **overrides) -> AsyncIterator[RequestOutput]:
        """Adds one request (``BatchEngine.add``'s arguments; a bad one raises here, before any
        output) and yields its progress after each step it takes part in, then its final output
        (``finished``, with ``result``)."""
        request_id = request_id if request_id is not None else f"async-{next(_IDS)}"
        queue: asyncio.Queue[RequestOutput | BaseException] = asyncio.Queue()
        with self._lock:
            self.engine.add(request_id, prompt, config, stream=True, **overrides)
        self._queues[request_id] = queue
        self._start()
        finished = False
        try:
            while True:
                output = await queue.get()
                if isinstance(output, BaseException):
                    raise output
                finished = output.finished
                yield output
                if finished:
                    return
        finally:
            self._queues.pop(request_id, None)
            if not finished:
                with self._lock:
                    self.engine.abort(request_id)

    async def abort(self, request_id: str) -> bool:
        """Stops a request; its ``generate`` ends (with CancelledError) at its next output."""
        with self._lock:
            known = self.engine.abort(request_id)
        queue = self._queues.pop(request_id, None)
        if queue is not None:
            queue.put_nowait(asyncio.CancelledError(f"request {request_id!r} was aborted"))
        return known

    def _start(self) -> None:
        if self._stepper is None or self._stepper.done():
            self._stepper = asyncio.get_running_loop().create_task(self._step_while_live())

    async def _step_while_live(self) -> None:
        while True:
            with self._lock:
                live = self.engine.has_unfinished()
            if not live:
                return
            try:
                outputs = await asyncio.to_thread(self._step)
            except Exception as error:  # noqa: BLE001 - every waiting consumer hears of it, then the stepping stops
                for queue in self._queues.values():
                    queue.put_nowait(error)
                raise
            for output in outputs:
                queue = self._queues.get(output.request_id)
                if queue is not None:
                    queue.put_nowait(output)

    def _step(self) -> list[RequestOutput]:
        with self._lock:
            return self.engine.step()
