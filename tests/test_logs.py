"""fl_core.logs: JSON lines hold this project's events in full and another library's by its message's template
alone, so an exception's text or a traceback never reaches them."""

from __future__ import annotations

import io
import json
import logging
import subprocess
import sys
import traceback
from pathlib import Path

import pytest

from fl_client.node import NodeSettings, NodeSettingsError
from fl_core.logs import json_handler, log_context

TEXT = "Displaced fracture of shaft of left femur"


def lines_of(*records: tuple[str, int, object, tuple[object, ...], dict[str, object]]) -> list[dict[str, object]]:
    stream = io.StringIO()
    handler = json_handler(stream, "test")
    for name, level, msg, args, extra in records:
        record = logging.LogRecord(name, level, __file__, 1, msg, args, None)
        record.__dict__.update(extra)
        handler.handle(record)
    return [json.loads(line) for line in stream.getvalue().splitlines()]


def test_another_librarys_record_keeps_its_template_never_the_values_put_into_it() -> None:
    try:
        raise ValueError(TEXT)
    except ValueError as err:
        failure, trace_text = err, traceback.format_exc()
    flower = lines_of(("flwr", logging.ERROR, failure, (), {}),
                      ("flwr", logging.ERROR, trace_text, (), {}),
                      ("flwr", logging.INFO, "Received: %s", (TEXT,), {"text": TEXT}),
                      ("flwr", logging.INFO, "", (), {}),  # Flower's blank line: no event
                      ("py.warnings", logging.WARNING, f"x.py:3: UserWarning: {TEXT}\n  warnings.warn(t)\n", (), {}))
    assert [line["event"] for line in flower] == ["ValueError", "Traceback (most recent call last):", "Received: %s",
                                                  "x.py:3: UserWarning"]
    assert TEXT not in json.dumps(flower) and all("text" not in line for line in flower)


def test_this_projects_events_carry_their_fields_and_context_but_cannot_replace_the_line_s_own() -> None:
    with log_context(run_id="run-1", hospital="hospital-0"):
        (line,) = lines_of(("federated_dp_llm.events", logging.INFO, "round %d", (2,),
                            {"seconds": 1.5, "event": "forged", "level": "debug", "run_id": "other"}))
    assert (line["event"], line["level"], line["run_id"], line["hospital"]) == ("round 2", "info", "run-1",
                                                                                 "hospital-0")
    assert line["seconds"] == 1.5 and line["component"] == "test" and line["trace_id"] is None


# A deployed node's task process (fl_client.runtime) with the task stubbed: it logs as the ClientApp's would, from
# this project's code, from Flower (a failing ClientApp's exception, a heartbeat thread) and through Python's warnings.
TASK = """
import logging, sys, threading, warnings
from flwr.common.logger import FLOWER_LOGGER
import fl_client.runtime as runtime
from fl_core.logs import log_context

def task(address, token, settings, parent_pid):
    with log_context(run_id="run-7"):
        logging.getLogger("fl_client.hospital").error("%s: plan for run %s refused", settings.hospital, "run-7")
        try:
            raise ValueError(sys.argv[1])
        except ValueError:
            FLOWER_LOGGER.exception("ClientApp raised an exception: %s", sys.argv[1])
    beat = threading.Thread(target=FLOWER_LOGGER.warning, args=("heartbeat failed: %s", sys.argv[1]))
    beat.start()
    beat.join()
    FLOWER_LOGGER.debug("pulled %s", sys.argv[1])
    warnings.warn(sys.argv[1])
    return 0

runtime.run_task = task
runtime.main(["--runtime-api-address", "127.0.0.1:1", "--token", "t", "--node-config", sys.argv[2]])
"""


def node_task_log(tmp_path: Path, log_format: str | None) -> subprocess.CompletedProcess[str]:
    config = tmp_path / "node.toml"
    config.write_text(f'hospital-id = "hospital-b"\nstate-dir = "{tmp_path}"\n'
                      + (f'log-format = "{log_format}"\n' if log_format else ""))
    return subprocess.run([sys.executable, "-c", TASK, TEXT, str(config)], capture_output=True, text=True,
                          timeout=120, check=True)


def test_a_nodes_task_process_writes_json_lines_with_its_hospital_when_its_settings_ask(tmp_path: Path) -> None:
    task = node_task_log(tmp_path, "json")
    lines = [json.loads(line) for line in task.stderr.splitlines()]
    assert task.stdout == "" and TEXT not in task.stderr
    assert [(line["logger"], line["event"]) for line in lines] == [
        ("fl_client.hospital", "hospital-b: plan for run run-7 refused"),
        ("flwr", "ClientApp raised an exception: %s"), ("flwr", "heartbeat failed: %s"),
        ("py.warnings", f"<string>:{TASK.splitlines().index('    warnings.warn(sys.argv[1])') + 1}: UserWarning")]
    assert all(line["hospital"] == "hospital-b" and line["component"] == "fl-clientapp" for line in lines)
    assert [line.get("run_id") for line in lines] == ["run-7", "run-7", None, None]
    assert lines[1]["error"] == "ValueError"
    with pytest.raises(NodeSettingsError, match="node setting log-format: unknown value 'xml'"):
        NodeSettings.from_node_config({"state-dir": str(tmp_path), "log-format": "xml"})


def test_a_nodes_text_log_has_each_of_flowers_records_once(tmp_path: Path) -> None:
    lines = node_task_log(tmp_path, None).stderr.splitlines()
    assert len([line for line in lines if "heartbeat failed" in line]) == 1
    assert not any("pulled" in line for line in lines)  # Flower's DEBUG records stay out
