"""A hospital node's log: `fl-node` and each task process it starts write their records on stderr, one line each;
with the node setting `log-format = "json"`, as JSON lines (`fl_core/logs.py`) that each name the hospital.

The node's operator chooses, never a run: a node's log is the hospital's. A JSON line holds this project's events,
of Flower's records the message template alone, never the values put into it (a failing ClientApp's exception
text, a traceback), and of Python's warnings where they were raised and their category. Flower's SuperNode process,
which `fl-node` starts and which only relays messages, keeps Flower's own text lines.
"""

from __future__ import annotations

import logging
from typing import TextIO

from fl_core.logs import json_handler, keep_text_out_of_logs

from .node import NodeSettings


def node_logs(settings: NodeSettings, component: str, stream: TextIO) -> None:
    """Every record of this process, Flower's included, once on `stream`, as the node's settings ask."""
    from flwr.common.logger import FLOWER_LOGGER, console_handler

    if settings.log_format == "json":
        handler = json_handler(stream, component, hospital=settings.hospital)
        keep_text_out_of_logs()
    else:
        handler = logging.StreamHandler(stream)
        handler.setFormatter(logging.Formatter("%(asctime)s %(name)s %(levelname)s %(message)s"))
    handler.setLevel(logging.INFO)  # Flower's logger passes on its DEBUG records too
    FLOWER_LOGGER.removeHandler(console_handler)  # Flower's records reach the root's handler: once, in its format
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(logging.INFO)
    logging.getLogger("httpx").setLevel(logging.WARNING)  # one line per runtime API call otherwise
