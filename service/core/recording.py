"""Recording what the fleet did: every step of recorded sessions, to Parquet, off the hot path.

A session is recorded when it asks at creation (``"record": true``) or falls in the sampled share
``TRMRL_RECORD_FRACTION``. After each forward pass the engine hands the recorded rows of the batch to
:meth:`Recorder.submit` as a block of arrays -- a copy of a few rows, never a wait: when the bounded
buffer is full the block is dropped and counted. A background thread turns blocks into Parquet row
groups and rotates files by size and age; a file is written as a hidden ``.*.parquet.partial`` and
renamed when complete, so a reader of the directory never sees half a file. :meth:`Recorder.close`
(on SIGTERM, through the app's shutdown) writes what is buffered. A failing disk costs the rows it
could not take (counted, logged, in ``/metrics``), never a step.

One row per step::

    session_id, model, version, episode, step_in_episode, step, observation [obs_dim] float32,
    reward (for the previous action; 0 at an episode start), action [act_dim] float32,
    applied_action [act_dim] (null unless the client said what ran), episode_start,
    received_at (Unix seconds), server_timing_us

Load a directory with ``pyarrow.parquet.read_table(DIR)`` (``.to_pandas()`` with pandas installed).
"""

from __future__ import annotations

import contextlib
import itertools
import logging
import os
import queue
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np

log = logging.getLogger("trmrl.service")

#: Columns of a recorded block, in file order.
COLUMNS = (
    "session_id",
    "model",
    "version",
    "episode",
    "step_in_episode",
    "step",
    "observation",
    "reward",
    "action",
    "applied_action",
    "episode_start",
    "received_at",
    "server_timing_us",
)


class Recorder:
    """A bounded buffer of recorded steps and the thread that writes them to ``directory``."""

    def __init__(
        self,
        directory: Path,
        *,
        buffer_rows: int = 262_144,
        rotate_rows: int = 1_000_000,
        rotate_s: float = 300.0,
        flush_s: float = 1.0,
        start: bool = True,
    ) -> None:
        self.directory = Path(directory)
        self.buffer_rows = buffer_rows
        self.rotate_rows = rotate_rows
        self.rotate_s = rotate_s
        self.flush_s = flush_s
        self.rows_written = 0
        self.rows_dropped = 0
        """Rows refused because the buffer was full (the writer fell behind)."""
        self.rows_lost = 0
        """Rows the disk did not take (write errors)."""
        self.files_written = 0
        self._pending = 0
        self._lock = threading.Lock()
        self._queue: queue.SimpleQueue[dict[str, Any] | None] = queue.SimpleQueue()
        self._names = itertools.count()
        self._thread = threading.Thread(target=self._run, name="recorder", daemon=True)
        self._closed = False
        # Imported now, at start-up: importing pyarrow costs a second of CPU, not to be spent mid-serving.
        import pyarrow.parquet  # noqa: F401

        if start:
            self._thread.start()

    def start(self) -> None:
        """Start the writer (made with ``start=False``: blocks wait in the buffer until then)."""
        self._thread.start()

    # -- the hot side ------------------------------------------------------------------------------------
    def submit(self, block: dict[str, Any]) -> bool:
        """Queue a block of rows for writing; ``False`` (and counted) when the buffer is full."""
        rows = len(block["step"])
        with self._lock:
            if self._closed or self._pending + rows > self.buffer_rows:
                self.rows_dropped += rows
                return False
            self._pending += rows
        self._queue.put(block)
        return True

    def close(self, timeout_s: float = 30.0) -> None:
        """Write everything buffered, close the current file and stop the writer thread."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
        self._queue.put(None)
        if self._thread.is_alive():
            self._thread.join(timeout_s)

    @property
    def pending_rows(self) -> int:
        return self._pending

    # -- the writer thread --------------------------------------------------------------------------------
    def _run(self) -> None:
        file = _File(self)
        blocks: list[dict[str, Any]] = []
        rows = 0
        last_flush = time.monotonic()
        while True:
            try:
                block = self._queue.get(timeout=self.flush_s)
            except queue.Empty:
                block = None if self._closed else {}
            if block:
                blocks.append(block)
                rows += len(block["step"])
            done = block is None
            now = time.monotonic()
            if blocks and (done or now - last_flush >= self.flush_s or rows >= 65_536):
                file.write(blocks)
                blocks, rows = [], 0
                last_flush = now
            if file.due(now) or done:
                file.finish()
            if done:
                return

    def _release(self, rows: int) -> None:
        with self._lock:
            self._pending -= rows


class _File:
    """The Parquet file being written (``.partial`` until it is complete)."""

    def __init__(self, recorder: Recorder) -> None:
        self.recorder = recorder
        self.writer: Any = None
        self.path: Path | None = None
        self.rows = 0
        self.opened = 0.0

    def due(self, now: float) -> bool:
        rec = self.recorder
        return self.writer is not None and (self.rows >= rec.rotate_rows or now - self.opened >= rec.rotate_s)

    def write(self, blocks: list[dict[str, Any]]) -> None:
        rec = self.recorder
        rows = sum(len(b["step"]) for b in blocks)
        try:
            table = to_table(blocks)
            if self.writer is None:
                self._open(table.schema)
            self.writer.write_table(table)
            self.rows += rows
            rec.rows_written += rows
        except OSError as exc:
            rec.rows_lost += rows
            log.error("recording: %d rows lost, the disk refused them (%s)", rows, exc)
            self._abandon()
        finally:
            rec._release(rows)

    def finish(self) -> None:
        if self.writer is None:
            return
        try:
            self.writer.close()
            assert self.path is not None
            os.replace(self.path, self.path.with_name(self.path.name[1:].removesuffix(".partial")))
            self.recorder.files_written += 1
        except OSError as exc:
            self.recorder.rows_lost += self.rows
            self.recorder.rows_written -= self.rows
            log.error("recording: a file of %d rows could not be completed (%s)", self.rows, exc)
        self.writer, self.path, self.rows = None, None, 0

    def _open(self, schema: Any) -> None:
        import pyarrow.parquet as pq

        rec = self.recorder
        rec.directory.mkdir(parents=True, exist_ok=True)
        stamp = time.strftime("%Y%m%dT%H%M%S", time.gmtime())
        # Hidden until complete: readers of the directory (pyarrow's dataset discovery) skip dot files.
        self.path = rec.directory / f".steps-{stamp}-{os.getpid()}-{next(rec._names):05d}.parquet.partial"
        # Snappy and dictionaries only where values repeat: recording shares the cores with serving.
        self.writer = pq.ParquetWriter(
            self.path, schema, compression="snappy", use_dictionary=["session_id", "model", "version"]
        )
        self.opened = time.monotonic()
        self.rows = 0

    def _abandon(self) -> None:
        """Drop a file that failed mid-way: its rows are counted as lost, the next write starts anew."""
        if self.writer is not None:
            with contextlib.suppress(OSError):
                self.writer.close()
            self.recorder.rows_lost += self.rows
            self.recorder.rows_written -= self.rows
        if self.path is not None:
            with contextlib.suppress(OSError):
                self.path.unlink(missing_ok=True)
        self.writer, self.path, self.rows = None, None, 0


def to_table(blocks: list[dict[str, Any]]) -> Any:
    """Recorded blocks as one Arrow table (vectors as fixed-size lists of float32).

    Runs on the writer thread while the event loop and the forward pass want the interpreter too,
    so it stays in C loops: no per-row Python.
    """
    import pyarrow as pa

    sizes = [len(b["step"]) for b in blocks]

    def column(name: str) -> Any:
        if name == "session_id":
            return pa.array(list(itertools.chain.from_iterable(b[name] for b in blocks)), pa.string())
        if name in ("model", "version"):
            # A block is one model version: a dictionary column of one entry per block.
            labels = [b[name] for b in blocks]
            indices = np.repeat(np.arange(len(blocks), dtype=np.int32), sizes)
            return pa.DictionaryArray.from_arrays(pa.array(indices), pa.array(labels, pa.string()))
        values = np.concatenate([b[name] for b in blocks])
        if values.ndim == 2:
            flat = pa.array(values.reshape(-1).astype(np.float32, copy=False), pa.float32())
            missing = np.isnan(values).all(axis=1) if name == "applied_action" else None
            mask = pa.array(missing) if missing is not None and missing.any() else None
            return pa.FixedSizeListArray.from_arrays(flat, values.shape[1], mask=mask)
        return pa.array(values)

    return pa.table({name: column(name) for name in COLUMNS})
