"""fl_core.logs: JSON lines hold this project's events in full and another library's by its message's template
alone, so an exception's text or a traceback never reaches them."""

from __future__ import annotations

import io
import json
import logging
import traceback

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
                      ("flwr", logging.INFO, "", (), {}))  # Flower's blank line: no event
    assert [line["event"] for line in flower] == ["ValueError", "Traceback (most recent call last):", "Received: %s"]
    assert TEXT not in json.dumps(flower) and all("text" not in line for line in flower)


def test_this_projects_events_carry_their_fields_and_context_but_cannot_replace_the_line_s_own() -> None:
    with log_context(run_id="run-1", hospital="hospital-0"):
        (line,) = lines_of(("federated_dp_llm.events", logging.INFO, "round %d", (2,),
                            {"seconds": 1.5, "event": "forged", "level": "debug", "run_id": "other"}))
    assert (line["event"], line["level"], line["run_id"], line["hospital"]) == ("round 2", "info", "run-1",
                                                                                 "hospital-0")
    assert line["seconds"] == 1.5 and line["component"] == "test" and line["trace_id"] is None
