"""What `fl-simulate` and `fl-train-local` show: their own lines (start, admission, one line per round, the final
table) and warnings on the console; everything, Flower's log included, in the run folder's `<command>.log`.
`verbose=true` puts Flower's log and the hospitals' (Ray actors') output back on the console."""

from __future__ import annotations

import logging
import sys
import threading
import time
import traceback
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, TextIO, cast

from .logs import events, json_handler

PACKAGES = ("fl_core", "fl_server", "fl_client", "strategies", "privacy")  # this project's loggers
# Notices about how we launch, not about the run: Flower's deprecation of run_simulation (README: why we keep it).
_LAUNCH_NOTICES = ("The `run_simulation` function is deprecated",)


class _Tee:
    """A text stream that writes to the console and, until it is detached, to the log file. Whatever took it as its
    stream meanwhile (a logging handler made during the run) keeps a working console after the run."""

    def __init__(self, console: TextIO, log: TextIO) -> None:
        self.console: TextIO = console
        self.log: TextIO | None = log

    def write(self, text: str) -> int:
        if self.log is not None:
            self.log.write(text)
        return self.console.write(text)

    def flush(self) -> None:
        if self.log is not None:
            self.log.flush()
        self.console.flush()

    def close(self) -> None:  # the console is not ours to close (logging closes its handlers' streams at exit)
        self.flush()

    def detach(self) -> None:
        self.flush()
        self.log = None

    def __getattr__(self, name: str) -> Any:  # isatty, fileno, encoding...: the console's
        return getattr(self.console, name)


def _not_a_launch_notice(record: logging.LogRecord) -> bool:
    return not any(notice in record.getMessage() for notice in _LAUNCH_NOTICES)


@contextmanager
def run_console(output_dir: Path, verbose: bool, command: str, log_format: str = "text") -> Iterator[None]:
    """Within the block: Flower's and MLflow's console output at WARNING (INFO when verbose), their whole logs and
    everything printed also written to `output_dir / <command>.log`; with `log_format` json, every log record at
    INFO or above, ours included (each round's event among them), also as a JSON line in `<command>.jsonl`."""
    import mlflow  # its import gives the mlflow logger its console handler, which is quieted below
    from flwr.common.logger import FLOWER_LOGGER

    output_dir.mkdir(parents=True, exist_ok=True)
    loggers = [FLOWER_LOGGER, logging.getLogger(mlflow.__name__)]
    with (output_dir / f"{command}.log").open("a", encoding="utf-8") as log:
        to_file = logging.StreamHandler(log)
        to_file.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
        consoles = [h for logger in loggers for h in logger.handlers]
        saved = [(logger, logger.propagate) for logger in loggers], [(h, h.level) for h in consoles]
        for logger in loggers:
            logger.propagate = False  # Opacus's import gives the root logger a handler: each line came twice
            logger.addHandler(to_file)
        for handler in consoles:
            handler.setLevel(logging.INFO if verbose else logging.WARNING)
            handler.addFilter(_not_a_launch_notice)
        stdout, stderr = sys.stdout, sys.stderr
        tees = _Tee(stdout, log), _Tee(stderr, log)
        sys.stdout, sys.stderr = tees
        try:
            with _json_lines(output_dir / f"{command}.jsonl" if log_format == "json" else None, command):
                yield
        except BaseException:
            log.write(traceback.format_exc())  # why the run failed, in its log too (the console shows it later)
            raise
        finally:
            sys.stdout, sys.stderr = stdout, stderr
            for tee in tees:
                tee.detach()
            for logger, propagates in saved[0]:
                logger.removeHandler(to_file)
                logger.propagate = propagates
            for handler, level in saved[1]:
                handler.removeFilter(_not_a_launch_notice)
                handler.setLevel(level)


@contextmanager
def _json_lines(path: Path | None, command: str) -> Iterator[None]:
    """With a path: JSON lines in that file for the block (`json_logs`)."""
    if path is None:
        yield
        return
    with path.open("a", encoding="utf-8") as stream:
        handler = json_logs(stream, command)
        try:
            yield
        finally:
            for logger in _json_loggers():
                logger.removeHandler(handler)


def _json_loggers() -> list[logging.Logger]:
    import mlflow
    from flwr.common.logger import FLOWER_LOGGER

    return [FLOWER_LOGGER, logging.getLogger(mlflow.__name__), *(logging.getLogger(n) for n in PACKAGES), events]


def json_logs(stream: TextIO, command: str) -> logging.Handler:
    """A JSON-lines handler on Flower's and MLflow's loggers (INFO and above), this project's (their warnings) and
    the run's events; returned so that it can be removed."""
    handler = json_handler(stream, command)
    handler.setLevel(logging.INFO)
    for logger in _json_loggers():
        logger.addHandler(handler)
    return handler


@contextmanager
def round_progress(server_round: int, rounds: int, expected_seconds: float | None, stream: TextIO | None = None,
                   interval: float = 1.0) -> Iterator[None]:
    """On a terminal, while a round runs: one line rewritten in place with its seconds so far, and a bar against
    the previous round's length once there is one; cleared when the round ends, for the round's own line. Elsewhere
    (a log, a pipe, a deployed ServerApp) nothing."""
    out = stream or cast(TextIO, getattr(sys.stdout, "console", sys.stdout))  # the terminal, not the run's log
    if not out.isatty():
        yield
        return
    stopped, started = threading.Event(), time.monotonic()

    def show() -> None:
        while not stopped.wait(interval):
            elapsed = time.monotonic() - started
            line = f"[round {server_round}/{rounds}] training on the hospitals' nodes, {elapsed:.0f}s"
            if expected_seconds:
                done = min(elapsed / expected_seconds, 1.0)
                line += f" [{'#' * round(20 * done):<20}] of about {expected_seconds:.0f}s"
            out.write(f"\r{line}\033[K")
            out.flush()

    ticker = threading.Thread(target=show, daemon=True)
    ticker.start()
    try:
        yield
    finally:
        stopped.set()
        ticker.join()
        out.write("\r\033[K")
        out.flush()
