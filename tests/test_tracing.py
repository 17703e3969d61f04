"""fl_core.tracing: off unless OpenTelemetry's variables ask, an unknown exporter refused by name, and a failing
block's span keeps the exception's type, never its message."""

from __future__ import annotations

import json
import os
import subprocess
import sys

PROGRAM = """
from fl_core.config import ConfigError
from fl_core.tracing import configure_tracing, traced
try:
    print("exporting", configure_tracing("test"), flush=True)
except ConfigError as err:
    print("refused", err, flush=True)
    raise SystemExit(0)
try:
    with traced("work", attributes={"route": "/v1/classify"}):
        raise ValueError("Displaced fracture of shaft of left femur")
except ValueError:
    pass
"""


def run(exporter: str | None) -> list[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("OTEL_")}
    if exporter is not None:
        env["OTEL_TRACES_EXPORTER"] = exporter
    out = subprocess.run([sys.executable, "-c", PROGRAM], capture_output=True, text=True, env=env, timeout=60)
    assert out.returncode == 0, out.stderr
    return out.stdout.splitlines()


def test_spans_are_exported_only_when_asked_and_keep_no_exception_message() -> None:
    assert run(None) == ["exporting False"] and run("none") == ["exporting False"]
    assert run("zipkin") == ["refused OTEL_TRACES_EXPORTER: unknown exporter 'zipkin'; choose one of otlp, console, "
                             "none"]
    first, line = run("console")
    span = json.loads(line)
    assert first == "exporting True" and span["name"] == "work"
    assert span["status"] == {"status_code": "ERROR", "description": "ValueError"}
    assert span["events"] == [] and "femur" not in line and span["resource"]["attributes"]["service.name"] == "test"
