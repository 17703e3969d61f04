"""Shared start-up for console entry points: quiet libraries, one-line errors for bad input."""

from __future__ import annotations

import argparse
import functools
import logging
import os
import sys
import warnings
from collections.abc import Callable
from typing import NoReturn, ParamSpec

P = ParamSpec("P")


def quiet_libraries() -> None:
    """Keep the console to our progress lines: transformers' load reports and progress bars add nothing."""
    import transformers

    transformers.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    warnings.filterwarnings("ignore", message=".*Optimal order is the largest alpha.*")
    warnings.filterwarnings("ignore", message=".*full backward hook.*")
    warnings.filterwarnings("ignore", category=DeprecationWarning)
    logging.getLogger("datasets").setLevel(logging.ERROR)


def exit_on_bad_input(program: str, run: Callable[[], object]) -> None:
    """Run `run`; a config or data error becomes one line on stderr and exit code 2, no traceback."""
    from .config import ConfigError  # here, not at the top: listing commands import this module and stay fast
    from .data import DataError

    try:
        run()
    except (ConfigError, DataError) as err:
        print(f"{program}: config error: {err}", file=sys.stderr)
        raise SystemExit(2) from None


class OneLineParser(argparse.ArgumentParser):
    """argparse whose usage errors are one line (program: problem) and exit code 2, like config errors."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: {message}\n")


def quiet_on_closed_pipe(main: Callable[P, None]) -> Callable[P, None]:
    """A console command whose reader goes away (`fl-ledger export --csv | head`) ends quietly with exit code 1,
    as Python's documentation recommends, instead of a BrokenPipeError traceback."""

    @functools.wraps(main)
    def run(*args: P.args, **kwargs: P.kwargs) -> None:
        try:
            main(*args, **kwargs)
            sys.stdout.flush()
        except BrokenPipeError:
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # the flush at exit would fail again
            raise SystemExit(1) from None

    return run
