"""One thread runs the engine for every connection; requests reach it through a queue.

The engine is not thread-safe, so only this thread calls it. HTTP handlers (on the asyncio event loop) call
`submit` and `abort`, which only enqueue commands; the thread applies them between steps, runs `step()` while
anything is unfinished, and hands each RequestOutput to the request's sink (a callable that moves it onto the
handler's asyncio queue with `call_soon_threadsafe`). A request the engine refuses (EngineError) gets the
exception in its sink instead. Engine statistics are published as an immutable snapshot after every step, so
/metrics never touches the engine.
"""
from __future__ import annotations

import logging
import queue
import threading
import time
import traceback

log = logging.getLogger("fastmath.serve")


class QueueFull(Exception):
    """More requests would wait for the engine than --max-queue allows."""


class EngineLoop:
    """Args:
        engine: a fastmath.engine.Engine (add_request/step/abort/has_unfinished/stats).
        max_queue: most requests waiting for the engine (not yet decoding); None = unbounded.
    """

    def __init__(self, engine, max_queue: int | None = None):
        self.engine = engine
        self.max_queue = max_queue
        self._commands: queue.SimpleQueue = queue.SimpleQueue()
        self._sinks: dict = {}  # request id -> sink; touched by the loop thread only
        self._lock = threading.Lock()  # guards _pending and snapshot
        self._pending = 0  # submitted requests the loop thread has not added yet
        self._stop = threading.Event()
        self._wake = threading.Event()
        self._thread = threading.Thread(target=self._run, name="fastmath-engine", daemon=True)
        self.error: str | None = None  # set if the loop thread dies
        self.counters = {"requests": 0, "aborted": 0, "rejected_queue_full": 0, "engine_errors": 0}
        self.snapshot = dict(engine.stats())

    # -- called from the event loop -----------------------------------------------------------------------

    def start(self) -> None:
        self._thread.start()

    def stop(self, timeout: float | None = 30.0) -> None:
        """Finish what is in flight (the HTTP server has stopped accepting), then end the thread."""
        self._stop.set()
        self._wake.set()
        self._thread.join(timeout)

    @property
    def alive(self) -> bool:
        return self._thread.is_alive() and self.error is None

    def submit(self, items, sink) -> None:
        """Queue requests [(request_id, prompt_ids, params)] that share one sink; all or none.

        Raises:
            QueueFull: they would make more than `max_queue` requests wait.
        """
        with self._lock:
            waiting = self.snapshot.get("waiting", 0) + self._pending
            if self.max_queue is not None and waiting + len(items) > self.max_queue:
                self.counters["rejected_queue_full"] += 1
                raise QueueFull(f"{waiting} requests are waiting for the engine (--max-queue {self.max_queue})")
            self._pending += len(items)
            self.counters["requests"] += len(items)
        for rid, prompt_ids, params in items:
            self._commands.put(("add", rid, prompt_ids, params, sink))
        self._wake.set()

    def abort(self, request_id: str, disconnected: bool = True) -> None:
        if disconnected:
            with self._lock:
                self.counters["aborted"] += 1
        self._commands.put(("abort", request_id))
        self._wake.set()

    # -- the loop thread ----------------------------------------------------------------------------------

    def _drain(self) -> None:
        added = 0
        while True:
            try:
                cmd = self._commands.get_nowait()
            except queue.Empty:
                break
            if cmd[0] == "add":
                _, rid, prompt_ids, params, sink = cmd
                added += 1
                try:
                    self.engine.add_request(rid, prompt_ids, params)
                    self._sinks[rid] = sink
                except ValueError as e:  # EngineError is a ValueError: this request can never be served
                    with self._lock:
                        self.counters["engine_errors"] += 1
                    sink(e)
            else:
                rid = cmd[1]
                self._sinks.pop(rid, None)
                self.engine.abort(rid)
        if added:
            self._publish(added)

    def _publish(self, added: int = 0) -> None:
        stats = dict(self.engine.stats())
        with self._lock:
            self._pending -= added
            self.snapshot = stats

    def _run(self) -> None:
        try:
            while True:
                self._drain()
                if not self.engine.has_unfinished():
                    self._publish()
                    if self._stop.is_set() and self._commands.empty():
                        return
                    self._wake.wait(0.5)
                    self._wake.clear()
                    continue
                try:
                    outputs = self.engine.step()
                except Exception:  # a bug, not the client's fault: fail the requests in flight, keep serving
                    msg = traceback.format_exc()
                    log.error("engine step failed; aborting the requests in flight:\n%s", msg)
                    for rid, sink in list(self._sinks.items()):
                        self.engine.abort(rid)
                        sink(RuntimeError("the engine failed while running this request"))
                    self._sinks.clear()
                    continue
                for out in outputs:
                    sink = self._sinks.get(out.request_id)
                    if sink is None:
                        continue  # aborted meanwhile
                    if out.finished:
                        del self._sinks[out.request_id]
                    sink(out)
                self._publish()
        except BaseException:  # the thread must never die silently: /health turns 503
            self.error = traceback.format_exc()
            log.error("the engine loop stopped:\n%s", self.error)
            for sink in self._sinks.values():
                sink(RuntimeError("the engine loop stopped"))
            time.sleep(0)
