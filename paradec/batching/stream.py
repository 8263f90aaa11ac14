"""asyncio access to a ``BatchEngine``: ``async for output in engine.generate(prompt, ...)``
streams one request's progress and ends with its result, while the engine steps every request
together in a worker thread (vLLM's ``AsyncLLMEngine`` shape, so another serving stack can
drive paradec without its ZeroMQ frontend).

The engine steps in one background task, only while requests are live, each step in a thread
(``asyncio.to_thread``) so the event loop stays free; ``add`` and ``abort`` take the same lock as
a step, in a thread too, so they land between steps without blocking the loop. A consumer that
stops iterating (``break``, cancellation, even while its request is being added) aborts its
request, freeing its row (in a thread as well; a new request with its id waits for that abort);
one whose request another task aborted gets ``RequestAborted`` and aborts nothing more, even
if a new request has taken its id meanwhile. A
step that raises drops the requests it was decoding, whose consumers get its error; the
waiting ones go on. If the stepper itself fails (its executor shut down, a ``BaseException`` out
of a step, the task cancelled), every open stream gets the error and its request is aborted:
none waits for a step that will not come. Requests stream their progress, so the engine looks
after every step while any is live. Progress is cumulative (steps and tokens committed so far), so
a consumer that lags behind the steps is handed the newest, not a backlog: a stream holds at most
one unread progress output (as vLLM's output collector merges a slow consumer's outputs).

One event loop at a time: the streams' queues and the stepper belong to the loop that runs
them. A call from another loop while that one runs (``asyncio.run`` per thread) raises
``RuntimeError``; once it has stopped (its ``asyncio.run`` returned), the next loop takes the
engine over, aborting the requests of streams the old loop left open.
"""

from __future__ import annotations

import asyncio
import itertools
import threading
from collections import deque
from collections.abc import AsyncIterator

from paradec.batching.engine import BatchEngine, RequestOutput, check_request_id
from paradec.errors import InputError

_IDS = itertools.count()


class RequestAborted(Exception):
    """The request was aborted (``AsyncBatchEngine.abort``) while its consumer waited for it."""


class _Outputs:
    """One stream's unread outputs: an unread progress output is replaced by the next one, so a
    consumer that lags holds one output a stream, whatever its request's steps; the final output
    and errors queue after it."""

    def __init__(self):
        self._items: deque[RequestOutput | BaseException] = deque()
        self._ready = asyncio.Event()

    def put_nowait(self, item: RequestOutput | BaseException) -> None:
        if self._items and _progress(item) and _progress(self._items[-1]):
            self._items[-1] = item
        else:
            self._items.append(item)
        self._ready.set()

    async def get(self) -> RequestOutput | BaseException:
        while not self._items:
            self._ready.clear()
            await self._ready.wait()
        return self._items.popleft()

    def clear(self) -> None:
        self._items.clear()


class _Held:
    """What a stream's ``_Stream`` needs to abort it: its id and queue once registered."""

    def __init__(self):
        self.request_id: str | None = None
        self.queue: _Outputs | None = None
        self.finished = False


class _Stream:
    """``AsyncBatchEngine.generate``'s async iterator: the outputs' async generator, which aborts
    its request when this is dropped unfinished (``__del__``: at once under CPython's reference
    counting) rather than when the event loop gets round to closing the generator."""

    def __init__(self, outputs, leave):
        self._outputs, self._leave = outputs, leave

    def __aiter__(self):
        return self

    def __anext__(self):
        return self._outputs.__anext__()

    def asend(self, value):
        return self._outputs.asend(value)

    def athrow(self, *args):
        return self._outputs.athrow(*args)

    def aclose(self):
        return self._outputs.aclose()

    def __del__(self):
        self._leave()


def _progress(item) -> bool:
    return isinstance(item, RequestOutput) and not item.finished


class AsyncBatchEngine:
    """Wraps ``engine``; use from one event loop at a time (module docstring)."""

    def __init__(self, engine: BatchEngine):
        if not isinstance(engine, BatchEngine):
            raise InputError(f"engine must be a paradec.batching.BatchEngine (BatchEngine(model, ...)), got "
                             f"{type(engine).__name__}")
        self.engine = engine
        self._lock = threading.Lock()
        self._queues: dict[str, _Outputs] = {}
        self._stepper: asyncio.Task | None = None
        self._adding: dict[str, asyncio.Future] = {}  # requests whose add runs in a thread: the add
        self._doomed: set[str] = set()  # of those, the ones aborted meanwhile
        # aborts of streams left early, running in a thread: set when landed (the thread removes its entry)
        self._aborting: dict[str, threading.Event] = {}
        self._loop: asyncio.AbstractEventLoop | None = None  # the loop the streams and the stepper run in

    def generate(self, prompt, config=None, *, request_id: str | None = None,
                 **overrides) -> AsyncIterator[RequestOutput]:
        """Adds one request (``BatchEngine.add``'s arguments; a bad one raises at the first
        ``anext``, before any output) and yields its progress after each step it takes part in (the
        newest, where the consumer fell behind), then its final output (``finished``, with
        ``result``). An id is in use while its request streams, and while an add of it that was
        aborted is still running; a request whose id's last stream was left early waits for that
        stream's abort to land first. A stream left unfinished aborts its request when it is closed
        (``aclose``, ``contextlib.aclosing``) or dropped: ``break`` out of ``async for`` over
        ``generate(...)`` drops it at once, so the id is free for the next call."""
        held = _Held()
        return _Stream(self._outputs(held, prompt, config, request_id, overrides), lambda: self._leave(held))

    async def _outputs(self, held: _Held, prompt, config, request_id: str | None,
                       overrides: dict) -> AsyncIterator[RequestOutput]:
        if request_id is not None:
            check_request_id(request_id)  # (before it is looked up among the streams)
        await self._bind()
        if "stream" in overrides:
            raise InputError("stream: every AsyncBatchEngine request streams its progress; leave the argument out")
        while (landed := self._aborting.get(request_id)) is not None:  # (else it would stop this request)
            await asyncio.to_thread(landed.wait)
        while request_id is None:  # a generated id, in use by no other request
            candidate = f"async-{next(_IDS)}"
            if candidate not in self._queues and candidate not in self.engine.ids:
                request_id = candidate
        if request_id in self._queues or request_id in self._adding:  # (an aborted add may still run)
            raise InputError(f"request id {request_id!r} is already in use")
        queue = _Outputs()
        self._queues[request_id] = queue  # before the add: no step's output for it can go unheard
        held.request_id, held.queue = request_id, queue
        adding = asyncio.ensure_future(asyncio.to_thread(self._locked, self.engine.add, request_id, prompt, config,
                                                         stream=True, **overrides))
        self._adding[request_id] = adding
        adding.add_done_callback(lambda _: self._adding.pop(request_id, None))
        try:
            await asyncio.shield(adding)
        except BaseException:  # refused, or cancelled while (or just after) its add ran in a thread
            self._drop_queue(request_id, queue)
            loop = asyncio.get_running_loop()  # once added, it is aborted (off the loop)
            if adding.done():
                self._abort_added(loop, adding, request_id)
            else:
                adding.add_done_callback(lambda f: self._abort_added(loop, f, request_id))
            raise
        if request_id in self._doomed:  # aborted while it was being added
            self._doomed.discard(request_id)
            await asyncio.to_thread(self._locked, self.engine.abort, request_id)
            self._drop_queue(request_id, queue)
            raise RequestAborted(f"request {request_id!r} was aborted")
        self._start()
        try:
            while True:
                output = await queue.get()
                if isinstance(output, BaseException):
                    raise output
                held.finished = output.finished
                if held.finished:  # its id is free once its result is out, whenever the consumer closes the stream
                    self._drop_queue(request_id, queue)
                yield output
                if held.finished:
                    return
        finally:
            # still this stream's: left early (break, cancellation). Not so: ``abort`` or a step
            # that raised ended the request already, and the id may be another request's by now
            owned = self._queues.get(request_id) is queue
            self._drop_queue(request_id, queue)
            if owned and not held.finished:  # no await here: this also runs when the consumer's task is cancelled
                self._abort_in_thread(request_id)

    def _leave(self, held: _Held) -> None:
        """A stream dropped unfinished (its ``_Stream`` collected): as ``abort``, without waiting;
        a read of it still pending hears ``RequestAborted``. From another thread (a collection
        there), in the streams' loop."""
        if held.queue is None or held.finished:
            return
        try:
            running = asyncio.get_running_loop()
        except RuntimeError:
            running = None
        if running is not self._loop and self._loop is not None and self._loop.is_running():
            self._loop.call_soon_threadsafe(self._leave_here, held)
        else:
            self._leave_here(held)

    def _leave_here(self, held: _Held) -> None:
        request_id, queue = held.request_id, held.queue
        if self._queues.get(request_id) is not queue:  # ended already (aborted, failed, finished)
            return
        self._drop_queue(request_id, queue)
        queue.put_nowait(RequestAborted(f"request {request_id!r} was aborted: its stream was dropped"))
        adding = self._adding.get(request_id)
        if adding is not None and not adding.done():  # aborted as its add lands (generate's doomed check)
            self._doomed.add(request_id)
        else:
            self._abort_in_thread(request_id)

    def _abort_added(self, loop: asyncio.AbstractEventLoop, add: asyncio.Future, request_id: str) -> None:
        """After the add of a request that was refused or whose consumer left mid-add (or as the
        add landed, before its ``generate`` resumed): abort it if it was added."""
        self._doomed.discard(request_id)
        if not add.cancelled() and add.exception() is None:
            self._abort_in_thread(request_id, loop)

    def _abort_in_thread(self, request_id: str, loop: asyncio.AbstractEventLoop | None = None) -> None:
        """Aborts ``request_id`` in a thread, not blocking the event loop while a step holds the
        lock; until it lands, a new request with that id waits (``generate``). Without a running
        loop (a stream closed after its loop ended) there is no loop to block: at once."""
        landed = threading.Event()

        def abort() -> None:
            with self._lock:
                try:
                    self.engine.abort(request_id)
                finally:
                    if self._aborting.get(request_id) is landed:
                        del self._aborting[request_id]
                    landed.set()

        try:
            loop = loop or asyncio.get_running_loop()
        except RuntimeError:
            abort()
            return
        self._aborting[request_id] = landed
        try:
            loop.run_in_executor(None, abort)
        except RuntimeError:  # its executor is shut down (the loop is ending): at once (else it would wait forever)
            abort()

    def _drop_queue(self, request_id: str, queue: _Outputs) -> None:
        if self._queues.get(request_id) is queue:
            del self._queues[request_id]

    async def abort(self, request_id: str) -> bool:
        """Stops a request (one being added too); its ``generate`` raises ``RequestAborted`` next
        (outputs not yet read are dropped). False, changing nothing, for an unknown request or
        one that finished (its result is still read)."""
        await self._bind()
        adding = self._adding.get(request_id)  # (looked up first: the add may end while the abort waits)
        known = await asyncio.to_thread(self._locked, self.engine.abort, request_id)
        if not known and adding is not None:
            if not adding.done():  # aborted as its add lands
                self._doomed.add(request_id)
                known = True
            elif adding.cancelled() or adding.exception() is not None:  # refused meanwhile: nothing to stop
                known = True
            else:  # added after the engine's abort looked (False if it has finished since)
                known = await asyncio.to_thread(self._locked, self.engine.abort, request_id)
        queue = self._queues.get(request_id)
        if known and queue is not None:
            del self._queues[request_id]
            queue.clear()  # outputs from before the abort are not delivered
            queue.put_nowait(RequestAborted(f"request {request_id!r} was aborted"))
        return known

    async def abort_all(self) -> int:
        """Aborts every request, streamed or added to the engine directly, waiting, decoding or
        being added (a server draining): each open stream raises ``RequestAborted`` next and the
        engine is idle after. How many requests were aborted."""
        await self._bind()
        aborted = 0
        for request_id in {*self._queues, *self._adding}:
            aborted += await self.abort(request_id)
        rest = await asyncio.to_thread(self._locked, lambda: [self.engine.abort(i) for i in list(self.engine.ids)])
        return aborted + sum(rest)

    async def _bind(self) -> None:
        """This loop's, unless another running loop has the engine; a stopped loop's streams are
        orphans (nothing will read them): their requests are aborted and this loop takes over."""
        loop = asyncio.get_running_loop()
        if self._loop is loop:
            return
        if self._loop is not None and self._loop.is_running():
            raise RuntimeError("this AsyncBatchEngine runs in another event loop, which is still running: its "
                               "queues and stepper belong to that loop; use one loop (or one engine per loop)")
        orphans = list(self._queues)
        self._loop, self._stepper = loop, None
        self._queues.clear()
        self._adding.clear()
        self._doomed.clear()
        for request_id in orphans:
            await asyncio.to_thread(self._locked, self.engine.abort, request_id)

    def _start(self) -> None:
        if self._stepper is None or self._stepper.done():
            self._stepper = asyncio.get_running_loop().create_task(self._step_while_live())

    async def _step_while_live(self) -> None:
        try:
            await self._step_until_idle()
        except BaseException as stopped:  # no step will come: every open stream hears why, its request aborted
            error = stopped if isinstance(stopped, Exception) and not isinstance(stopped, asyncio.CancelledError) \
                else RuntimeError(f"the engine's stepper stopped: {type(stopped).__name__}: {stopped}")
            for request_id, queue in list(self._queues.items()):
                del self._queues[request_id]
                queue.put_nowait(error)
                self._abort_in_thread(request_id)
            if isinstance(stopped, asyncio.CancelledError):
                raise

    async def _step_until_idle(self) -> None:
        while True:
            outputs, live, error, dropped = await asyncio.to_thread(self._step)
            for request_id in dropped:  # a step that raised dropped its live requests: their consumers hear why
                queue = self._queues.pop(request_id, None)
                if queue is not None:
                    queue.put_nowait(error)
            for output in outputs:
                queue = self._queues.get(output.request_id)
                if queue is not None:
                    queue.put_nowait(output)
            # asked again here, in the event loop: a request added after that step (its add done
            # in a thread) whose generate() saw this task not yet done is stepped by it
            if not live and not self.engine.has_unfinished():
                return

    def _step(self) -> tuple[list[RequestOutput], bool, Exception | None, set[str]]:
        """One engine step (none when idle) under the lock: its outputs, whether requests are
        left, and if it raised, the error and the requests it dropped (the waiting ones stay)."""
        with self._lock:
            if not self.engine.has_unfinished():
                return [], False, None, set()
            before = set(self.engine.ids)
            try:
                outputs = self.engine.step()
            except Exception as error:  # noqa: BLE001 - handed to the consumers of the requests dropped
                return [], self.engine.has_unfinished(), error, before - self.engine.ids
            return outputs, self.engine.has_unfinished(), None, set()

    def _locked(self, call, *args, **kwargs):
        with self._lock:
            return call(*args, **kwargs)
