"""Shared start-up for console entry points: quiet libraries, one-line errors for bad input."""

from __future__ import annotations

import argparse
import functools
import logging
import os
import sys
import warnings
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, NoReturn, ParamSpec

if TYPE_CHECKING:
    from .config import AppConfig

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
    warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*")  # transformers, inside peft
    warnings.filterwarnings("ignore", message=".*RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO.*")  # Ray's future default
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


def hydra_jobs(argv: Sequence[str]) -> tuple[argparse.Namespace, list[list[str]]]:
    """A command line as Hydra reads it: its flags, and the config overrides of each job it would run (`-m
    privacy.target_epsilon=4,8` is two jobs), without `hydra.*` settings, so that every job is checked first."""
    from hydra._internal.core_plugins.basic_sweeper import BasicSweeper
    from hydra._internal.utils import get_args_parser
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from hydra.errors import HydraException

    from .config import ConfigError

    args = get_args_parser().parse_args(list(argv))
    task = [o for o in args.overrides if not o.lstrip("+~").startswith(("hydra.", "hydra/"))]
    if not args.multirun:
        return args, [task]
    try:
        batches = BasicSweeper.split_arguments(OverridesParser.create().parse_overrides(task), None)
    except HydraException as err:
        raise ConfigError("overrides", str(err).splitlines()[0]) from None
    return args, [job for batch in batches for job in batch]


def check_every_job(argv: Sequence[str], check: Callable[[AppConfig], object] = lambda cfg: cfg) -> None:
    """Compose and validate the config of every job the command line asks for, and `check` it, before the first
    starts: Hydra would report a bad override in several lines, and in a sweep only when its job comes. Nothing to
    check when Hydra only prints something (--help, --hydra-help, --cfg, --info, --shell-completion)."""
    from .config import compose_config, to_app_config

    args, jobs = hydra_jobs(argv)
    if not (args.help or args.hydra_help or args.cfg or args.info or args.shell_completion):
        for job in jobs:
            check(to_app_config(compose_config(job)))


def job_overrides(task_overrides: Sequence[str], job_folder: str) -> list[str]:
    """A Hydra job's overrides, writing in the job's own folder unless they name `output_dir` (a resume writes
    where it resumes: fl_core.artifacts.run_folder)."""
    from .config import override_key

    if any(override_key(o) == "output_dir" for o in task_overrides):
        return list(task_overrides)
    return [*task_overrides, f"output_dir={job_folder}"]
