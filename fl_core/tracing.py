"""OpenTelemetry tracing, configured by OpenTelemetry's own environment variables and off unless they ask for it.

`OTEL_TRACES_EXPORTER=otlp` exports spans over OTLP/HTTP to `OTEL_EXPORTER_OTLP_ENDPOINT` (Jaeger's 4318 in the
compose file; the exporter reads the standard OTEL_EXPORTER_OTLP_* variables), `console` prints each span as one JSON
line on stdout, and `none` or nothing (the default here, unlike the SDK's) traces nothing: every span is then a
no-op. `OTEL_SERVICE_NAME` overrides the service's name. Spans carry routes, statuses, counts and ids, never a
request's text, a token, a user, a record or a metric outside a run's declared release.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from opentelemetry import trace

from .config import ConfigError

EXPORTERS = ("otlp", "console", "none")
tracer = trace.get_tracer("federated-dp-llm")  # a proxy: real once configure_tracing sets a provider


@contextmanager
def traced(name: str, **options: Any) -> Iterator[trace.Span]:
    """A span around a block that keeps an exception's type in its status, never its message (a message can hold
    what a request sent)."""
    with tracer.start_as_current_span(name, record_exception=False, set_status_on_exception=False,
                                      **options) as span:
        try:
            yield span
        except BaseException as err:
            span.set_status(trace.Status(trace.StatusCode.ERROR, type(err).__name__))
            raise


def configure_tracing(service: str) -> bool:
    """Set the process's tracer provider from the environment; True when spans are exported. An exporter this
    does not know is a one-line ConfigError naming the variable, before the service starts."""
    exporter_name = os.environ.get("OTEL_TRACES_EXPORTER", "none").strip().lower() or "none"
    if exporter_name not in EXPORTERS:
        raise ConfigError("OTEL_TRACES_EXPORTER", f"unknown exporter {exporter_name!r}; choose one of "
                                                  f"{', '.join(EXPORTERS)}")
    if exporter_name == "none" or os.environ.get("OTEL_SDK_DISABLED", "").strip().lower() == "true":
        return False
    from opentelemetry.sdk.resources import Resource
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import BatchSpanProcessor, ConsoleSpanExporter, SimpleSpanProcessor

    if isinstance(trace.get_tracer_provider(), TracerProvider):  # set once per process (a sweep runs several jobs)
        return True

    provider = TracerProvider(resource=Resource.create({"service.name": os.environ.get("OTEL_SERVICE_NAME", service)}))
    if exporter_name == "otlp":
        from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter

        provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter()))
    else:
        provider.add_span_processor(SimpleSpanProcessor(ConsoleSpanExporter(
            formatter=lambda span: span.to_json(indent=None) + "\n")))
    trace.set_tracer_provider(provider)  # flushed and shut down at exit by the SDK
    return True
