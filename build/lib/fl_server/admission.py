"""Before round 1 every hospital's node admits or refuses the run; when it ends, each closes its ledger entry.

Both are plaintext get_properties exchanges outside SecAgg+, so a refusal reaches the server with its reason: the
server logs and records it, then goes on with the admitted hospitals if there are at least `min_participants`, or
stops before any training.
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

from flwr.common import GetPropertiesIns, Scalar
from flwr.server.client_manager import ClientManager
from flwr.server.client_proxy import ClientProxy

from fl_core.protocol import ADMIT, LEDGER_ACTION, RUN_ID

Answers = dict[str, dict[str, Scalar]]


class AdmissionFailed(RuntimeError):
    """Too few hospitals admitted the run; nothing was trained and nothing is charged."""


@dataclass
class Admission:
    run_id: str
    admitted: dict[str, ClientProxy] = field(default_factory=dict)  # node id -> proxy
    hospitals: dict[str, str] = field(default_factory=dict)  # node id -> hospital
    plans: Answers = field(default_factory=dict)  # hospital -> planned epsilon and ledger balance
    refusals: dict[str, str] = field(default_factory=dict)  # hospital -> reason


def ask(proxies: list[ClientProxy], config: dict[str, Scalar],
        timeout: float) -> list[tuple[ClientProxy, dict[str, Scalar] | BaseException]]:
    """Send one plaintext properties request to each node at once; an unreachable node answers with its error."""

    def one(proxy: ClientProxy) -> dict[str, Scalar] | BaseException:
        try:
            return dict(proxy.get_properties(GetPropertiesIns(dict(config)), timeout=timeout, group_id=0).properties)
        except Exception as err:  # one node's failure is that node's answer, not the run's
            return err

    if not proxies:
        return []
    with ThreadPoolExecutor(max_workers=len(proxies)) as pool:
        return list(zip(proxies, pool.map(one, proxies), strict=True))


def admit_run(client_manager: ClientManager, run_id: str, expected: int, join_timeout: float) -> Admission:
    """Wait up to `join_timeout` for `expected` hospitals, then ask every connected one to admit the run."""
    client_manager.wait_for(expected, int(join_timeout))
    admission = Admission(run_id)
    config: dict[str, Scalar] = {LEDGER_ACTION: ADMIT, RUN_ID: run_id}
    for proxy, answer in ask(list(client_manager.all().values()), config, join_timeout):
        if isinstance(answer, BaseException):
            admission.refusals[f"node {proxy.cid}"] = f"no answer to admission: {answer}"
        elif answer.get("admitted") is True:
            hospital = str(answer["hospital"])
            admission.admitted[proxy.cid] = proxy
            admission.hospitals[proxy.cid] = hospital
            admission.plans[hospital] = {k: v for k, v in answer.items() if k not in ("hospital", "admitted")}
        else:
            admission.refusals[str(answer.get("hospital", f"node {proxy.cid}"))] = str(answer.get("reason", ""))
    return admission


def close_run(admission: Admission, status: str, timeout: float) -> Answers:
    """Tell each admitted hospital the run ended (committed or aborted); returns each one's ledger balance."""
    config: dict[str, Scalar] = {LEDGER_ACTION: status, RUN_ID: admission.run_id}
    closed: Answers = {}
    for proxy, answer in ask(list(admission.admitted.values()), config, timeout):
        hospital = admission.hospitals[proxy.cid]
        closed[hospital] = ({"error": f"no answer: {answer}"} if isinstance(answer, BaseException)
                            else {k: v for k, v in answer.items() if k != "hospital"})
    return closed
