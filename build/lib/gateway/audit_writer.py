"""The gateway's audit records, written off the event loop and committed together (group commit): each request's
record is on disk before its answer leaves, and a write lock held elsewhere delays answers, never drops a record."""

from __future__ import annotations

import asyncio
import logging
import queue
import sqlite3
import threading
import time

from .audit import AuditEvent, AuditLog

MAX_BATCH = 512  # records per transaction
RETRY_INTERVAL = 1.0  # seconds between attempts while the log cannot be written

log = logging.getLogger(__name__)
Pending = tuple[AuditEvent, "asyncio.Future[int]", asyncio.AbstractEventLoop]


def _settle(future: asyncio.Future[int], seq: int | None, error: BaseException | None) -> None:
    if future.cancelled():  # the client left; its record is written all the same
        return
    if seq is None:
        future.set_exception(error or AuditWriterStopped("no record was written"))
    else:
        future.set_result(seq)


class AuditWriterStopped(RuntimeError):
    """Records can no longer be written: no answer may leave."""


class AuditWriter:
    """One thread owns the writes: it takes every record queued since its last commit and commits them at once."""

    def __init__(self, audit: AuditLog) -> None:
        self.audit = audit
        self._queue: queue.SimpleQueue[Pending | None] = queue.SimpleQueue()
        self._closed = False
        self.sealed = audit.tail().seq  # the newest record committed and sealed
        self._thread = threading.Thread(target=self._run, name="audit-writer", daemon=True)
        self._thread.start()

    async def record(self, event: AuditEvent) -> int:
        """The record's sequence number, once it is committed."""
        if self._closed or not self._thread.is_alive():
            raise AuditWriterStopped("the audit writer has stopped")
        loop = asyncio.get_running_loop()
        future: asyncio.Future[int] = loop.create_future()
        self._queue.put((event, future, loop))
        return await future

    def close(self) -> None:
        """Write what is queued, then stop."""
        self._closed = True
        self._queue.put(None)
        self._thread.join()

    def _run(self) -> None:
        stopping = False
        while not stopping:
            first = self._queue.get()
            if first is None:
                return
            batch = [first]
            while len(batch) < MAX_BATCH:
                try:
                    item = self._queue.get_nowait()
                except queue.Empty:
                    break
                if item is None:
                    stopping = True
                    break
                batch.append(item)
            self._commit(batch)

    def _commit(self, batch: list[Pending]) -> None:
        events = [event for event, _, _ in batch]
        while True:
            try:
                committed = self.audit.append_all(events)
                self.sealed = committed[-1]
                seqs: list[int | None] = list(committed)
                error: BaseException | None = None
                break
            except sqlite3.OperationalError as err:  # locked by another process, disk full: wait, never drop
                log.warning("audit log not writable (%s): %d answers wait for their records", err, len(events))
                time.sleep(RETRY_INTERVAL)
            except Exception as err:  # the requests fail: no answer leaves without its record
                log.exception("audit log write failed")
                seqs, error = [None] * len(events), err
                break
        for (_, future, loop), seq in zip(batch, seqs, strict=True):
            try:
                loop.call_soon_threadsafe(_settle, future, seq, error)
            except RuntimeError:  # that request's event loop has closed: nobody waits for it, the writer goes on
                log.warning("audit record %s committed after its event loop closed", seq)
