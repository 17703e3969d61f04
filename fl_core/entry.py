"""Shared start-up for console entry points: quiet libraries, one-line errors for bad input."""

from __future__ import annotations

import argparse
import logging
import os
import sys
import warnings
from collections.abc import Callable
from typing import NoReturn

from .config import ConfigError
from .data import DataError


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
    try:
        run()
    except (ConfigError, DataError) as err:
        print(f"{program}: config error: {err}", file=sys.stderr)
        raise SystemExit(2) from None


class OneLineParser(argparse.ArgumentParser):
    """argparse whose usage errors are one line (program: problem) and exit code 2, like config errors."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: {message}\n")
