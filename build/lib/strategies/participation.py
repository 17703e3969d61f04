"""Which hospitals a round may sample: only those whose nodes admitted the run."""

from __future__ import annotations

import time

from flwr.server.client_manager import ClientManager
from flwr.server.client_proxy import ClientProxy
from flwr.server.criterion import Criterion


class _Admitted(Criterion):
    def __init__(self, admitted: set[str], also: Criterion | None) -> None:
        self.admitted = admitted
        self.also = also

    def select(self, client: ClientProxy) -> bool:
        return client.cid in self.admitted and (self.also is None or self.also.select(client))


class AdmittedClients(ClientManager):
    """The server's client manager as a strategy should see it: the admitted hospitals, nothing else.

    `await_admitted` lets a round wait for admitted hospitals that are offline, so a node that restarts between
    rounds is back in the next one instead of being skipped for a few seconds' absence.
    """

    def __init__(self, inner: ClientManager, admitted: set[str]) -> None:
        self.inner = inner
        self.admitted = admitted

    def await_admitted(self, timeout: float) -> None:
        """Wait up to `timeout` seconds until every admitted hospital is connected."""
        deadline = time.monotonic() + timeout
        while len(self.all()) < len(self.admitted) and time.monotonic() < deadline:
            time.sleep(1.0)

    def num_available(self) -> int:
        return len(self.all())

    def register(self, client: ClientProxy) -> bool:
        return self.inner.register(client)

    def unregister(self, client: ClientProxy) -> None:
        self.inner.unregister(client)

    def all(self) -> dict[str, ClientProxy]:
        return {cid: proxy for cid, proxy in self.inner.all().items() if cid in self.admitted}

    def wait_for(self, num_clients: int, timeout: int) -> bool:
        return self.inner.wait_for(num_clients, timeout)

    def sample(self, num_clients: int, min_num_clients: int | None = None,
               criterion: Criterion | None = None) -> list[ClientProxy]:
        return self.inner.sample(num_clients, min_num_clients, _Admitted(self.admitted, criterion))
