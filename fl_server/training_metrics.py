"""Prometheus metrics of a running federated run, for the operators' Grafana: each hospital's epsilon as its
accountant gives it, the round, and the server's scores on its public test set. Off unless `tracking.metrics_port`
is set (the chart sets it through FL_TRAINING_METRICS_PORT in the ServerApp runner). Only what the run's privacy
report shows anyway: nothing a hospital sent outside its declared release."""

from __future__ import annotations

import sys
from wsgiref.simple_server import WSGIServer

from prometheus_client import CollectorRegistry, Gauge, start_http_server


class TrainingMetrics:
    def __init__(self, run_id: str, port: int, host: str) -> None:
        self.run_id = run_id
        self.registry = CollectorRegistry()
        self.epsilon = Gauge("training_epsilon", "Record-level epsilon each hospital has spent in this run, by its "
                             "accountant", ["run", "hospital"], registry=self.registry)
        self.round = Gauge("training_round", "The last completed round", ["run"], registry=self.registry)
        self.score = Gauge("training_eval", "The global model's scores on the server's public test set",
                           ["run", "metric"], registry=self.registry)
        self.hospitals = Gauge("training_hospitals_aggregated", "Hospitals whose update the last round aggregated",
                               ["run"], registry=self.registry)
        self.server: WSGIServer | None = None
        try:
            self.server, _ = start_http_server(port, addr=host, registry=self.registry)
        except OSError as err:  # another run holds the port: train on, without metrics
            print(f"[metrics] tracking.metrics_port {port} on {host}: {err.strerror}; this run exports no metrics",
                  file=sys.stderr, flush=True)

    def on_round(self, server_round: int, epsilon: dict[str, float], scores: dict[str, float],
                 hospitals: int) -> None:
        for hospital, value in epsilon.items():
            self.epsilon.labels(self.run_id, hospital).set(value)
        for name, value in scores.items():
            self.score.labels(self.run_id, name).set(value)
        self.round.labels(self.run_id).set(server_round)
        self.hospitals.labels(self.run_id).set(hospitals)

    def close(self) -> None:
        if self.server is not None:
            self.server.shutdown()
            self.server.server_close()  # the port is free for the next run in this process (a sweep)
