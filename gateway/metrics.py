"""Prometheus metrics of one gateway; the alert rules and Grafana dashboard in `docker/monitoring/` use these names."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

ACCESS_LOGGER = "gateway.access"  # a JSON line per request with log_format json (route, status, duration; no user)
BUDGET_BUCKETS = (0.25, 0.5, 0.75, 0.9, 1.0)
LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.2, 0.5, 1.0, 2.5, 5.0, 10.0, 20.0, 45.0)


class GatewayMetrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.request_duration = Histogram(
            "request_duration_seconds", "Time from a request's arrival to its answer.", ["route"],
            buckets=LATENCY_BUCKETS, registry=self.registry)
        self.requests = Counter("requests", "Requests answered, by route and HTTP status.", ["route", "status"],
                                registry=self.registry)
        # a distribution over queries, not a gauge per user: metrics are read without authentication and must not
        # name who asks
        self.budget_spent = Histogram(
            "privacy_budget_spent_fraction", "Share of the user's epsilon spent once a noisy-vote query is charged.",
            buckets=BUDGET_BUCKETS, registry=self.registry)
        self.node_health = Gauge("federated_node_health", "1 if a model backend passes its health check, else 0.",
                                 ["backend", "hospital"], registry=self.registry)
        self.circuit_open = Gauge("backend_circuit_open", "1 if a backend's circuit is open (by failures or admin).",
                                  ["backend"], registry=self.registry)
        self.in_flight = Gauge("requests_in_flight", "Requests being answered now.", registry=self.registry)
        # a witness outside the gateway's volumes: a log later found to end before the last scraped value was cut
        self.audit_sealed = Gauge("audit_sealed_seq", "Sequence number of the newest audit record committed and "
                                  "sealed (fl-audit verify --at-least).", registry=self.registry)
        self.budget_exhausted = Counter("privacy_budget_refusals", "Noisy-vote queries refused: budget exhausted.",
                                        registry=self.registry)
        self.deployment_spent = Gauge(
            "privacy_deployment_epsilon_spent", "epsilon the noisy vote has spent over a hospital model's records, "
            "all users together (as of this gateway's last charge).", ["hospital"], registry=self.registry)
        self.deployment_total = Gauge("privacy_deployment_epsilon_total",
                                      "epsilon each hospital model may spend over all users.", registry=self.registry)
        self.deployment_exhausted = Counter(
            "privacy_deployment_budget_refusals", "Noisy-vote queries refused: a hospital model's total is spent.",
            registry=self.registry)
