"""A real federation on 127.0.0.1: a SuperLink and three hospitals' nodes (`fl-node`), over TLS with node
authentication, each running only the app bundle its hospital approved.

Every process is started here through `scripts/federation.py` (the commands the README gives an operator) in its
own session, and killed with its whole process group at the end, so nothing outlives the module.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import ssl
import subprocess
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient
from servers import accepts_connections, free_port, kill_group, wait_until

from fl_client.bundles import approve
from privacy.ledger import COMMITTED, RESERVED, Entry, Ledger
from scripts.federation import connect, flower_command, init, write_partitions

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[1]
HOSPITALS = ("h0", "h1", "h2")
FEDERATION = "hospitals"
DATA = ["model=tiny", "data.max_train_examples=256", "data.max_test_examples=64", "federation.partitioning=iid"]
UNREGISTERED_NODE = 305  # Flower's error code for a SuperNode whose public key the SuperLink does not know


@dataclass
class Federation:
    root: Path
    env: dict[str, str]
    superlink_port: int
    processes: dict[str, subprocess.Popen[bytes]] = field(default_factory=dict)

    @property
    def certs(self) -> Path:
        return self.root / "certs"

    def start(self, name: str, args: list[str], cwd: Path | None = None) -> subprocess.Popen[bytes]:
        log = (self.root / f"{name}.log").open("ab")
        proc = subprocess.Popen([sys.executable, "-m", "scripts.federation", *args], cwd=cwd or REPO, env=self.env,
                                stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        self.processes[name] = proc
        return proc

    def start_node(self, hospital: str, data_of: str | None = None) -> subprocess.Popen[bytes]:
        return self.start(hospital, ["supernode", str(self.certs), hospital,
                                     "--superlink", f"127.0.0.1:{self.superlink_port}",
                                     "--data-dir", str(self.root / "data" / (data_of or hospital)),
                                     "--state", str(self.state(hospital)), "--clientapp-port", str(free_port())])

    def submit(self, app: Path, overrides: list[str], name: str,
               typed: dict[str, object] | None = None) -> subprocess.Popen[bytes]:
        """A researcher's `flwr run` of `app` with these overrides and typed run-config keys; output in NAME.log."""
        keys = "".join(f"{key} = {json.dumps(value)}\n" for key, value in (typed or {}).items())
        (self.root / f"{name}.toml").write_text(f'{keys}overrides = "{" ".join(overrides)}"\n')
        log = (self.root / f"{name}.log").open("wb")
        command = [flower_command("flwr"), "run", str(app), FEDERATION, "--stream", "--run-config",
                   str(self.root / f"{name}.toml")]
        run = subprocess.Popen(command, cwd=REPO, env=self.env, stdout=log, stderr=subprocess.STDOUT,
                               start_new_session=True)
        self.processes[name] = run
        return run

    def state(self, hospital: str) -> Path:
        return self.root / "state" / hospital

    def kill(self, name: str) -> None:
        kill_group(self.processes.pop(name))

    def log(self, name: str) -> str:
        return (self.root / f"{name}.log").read_text(errors="replace")


@pytest.fixture(scope="module")
def federation(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Federation]:
    root = tmp_path_factory.mktemp("federation")
    # PYTHONPATH: the SuperLink runs in the federation's folder (its MLflow artifacts land there, not in the repo)
    env = {**os.environ, "FLWR_HOME": str(root / "flwr"), "PYTHONPATH": str(REPO)}
    fed = Federation(root, env, free_port())
    init(fed.certs, [*HOSPITALS, "intruder"], ["superlink.hospitals.example"], days=30)
    write_partitions(root / "data", HOSPITALS, DATA)
    for hospital in [*HOSPITALS, "intruder"]:  # each hospital's officer approves this release of the app
        approve(REPO, fed.state(hospital) / "approved-bundles.txt", note="federated-dp-llm under test")
    try:
        fed.start("superlink", ["superlink", str(fed.certs), "--port", str(fed.superlink_port)], cwd=root)
        wait_until(lambda: accepts_connections(fed.superlink_port), 60, "the SuperLink")
        with pytest.MonkeyPatch.context() as patch:
            patch.setenv("FLWR_HOME", env["FLWR_HOME"])  # connect() writes the researcher's Flower config there
            connect(FEDERATION, f"127.0.0.1:{fed.superlink_port}", fed.certs / "ca.crt")
        registered = subprocess.run([sys.executable, "-m", "scripts.federation", "register", str(fed.certs),
                                     FEDERATION, "--hospitals", *HOSPITALS], cwd=REPO, env=env,
                                    capture_output=True, text=True, timeout=120)
        assert registered.returncode == 0, registered.stdout + registered.stderr
        for hospital in HOSPITALS:
            fed.start_node(hospital)
        yield fed
    finally:
        for name in list(fed.processes):
            fed.kill(name)


def test_the_superlink_speaks_only_tls_with_the_federations_certificate(federation: Federation) -> None:
    with socket.create_connection(("127.0.0.1", federation.superlink_port), timeout=5) as s:
        s.sendall(b"GET / HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
        assert not s.recv(64).startswith(b"HTTP/")  # plaintext gets no HTTP answer at all
    context = ssl.create_default_context(cafile=str(federation.certs / "ca.crt"))
    with socket.create_connection(("127.0.0.1", federation.superlink_port), timeout=5) as raw, \
            context.wrap_socket(raw, server_hostname="127.0.0.1") as tls:
        assert tls.version() in ("TLSv1.2", "TLSv1.3")  # verified against the CA, hostname 127.0.0.1 by its SAN


def test_a_modified_app_bundle_is_refused_by_every_node_and_nothing_trains(federation: Federation,
                                                                            tmp_path: Path) -> None:
    """The researcher's bundle turns the noise off in the ClientApp; no hospital approved that bundle."""
    modified = tmp_path / "federated-dp-llm"
    shutil.copytree(REPO, modified, ignore=shutil.ignore_patterns(".venv", ".git", "outputs", "__pycache__"))
    hospital_code = modified / "fl_client" / "hospital.py"
    hospital_code.write_text(hospital_code.read_text().replace("noise_multiplier=planned.noise_multiplier",
                                                               "noise_multiplier=0.0"))
    before = {h: Ledger(federation.state(h) / "ledger.sqlite").entries() for h in HOSPITALS}
    run = federation.submit(modified, [*DATA, "train.device=cpu", "federation.num_rounds=1",
                                       f"output_dir={federation.root / 'refused-run'}",
                                       f"tracking.mlflow_uri=sqlite:///{federation.root / 'mlflow.db'}"], "modified")
    run.wait(timeout=300)  # `flwr run --stream` exits 0 whatever the ServerApp did: its output says
    federation.processes.pop("modified")
    out = federation.log("modified")
    assert "0 of 3 hospitals admitted the run" in out and "is not approved by this hospital" in out, out[-3000:]
    for hospital in HOSPITALS:
        refusals = [line for line in federation.log(hospital).splitlines()
                    if "is not approved by this hospital" in line]
        assert refusals and f"{hospital}: app bundle sha256:" in refusals[0]
        ledger = Ledger(federation.state(hospital) / "ledger.sqlite")
        assert ledger.entries() == before[hospital]  # nothing charged
        assert any("is not approved by this hospital" in str(r["reason"]) for r in ledger.refusals(hospital))


def test_a_node_without_a_state_folder_or_approvals_does_not_start(federation: Federation) -> None:
    config = federation.root / "bare-node.toml"
    config.write_text('hospital-id = "h9"\n')
    proc = subprocess.run([sys.executable, "-m", "fl_client.node_launcher", "run", str(config),
                           "--superlink", f"127.0.0.1:{federation.superlink_port}",
                           "--root-certificates", str(federation.certs / "ca.crt"),
                           "--auth-supernode-private-key", str(federation.certs / "nodes" / "h0" / "node.key")],
                          cwd=REPO, env=federation.env, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2
    assert proc.stderr.strip() == "fl-node: node setting state-dir: required: the folder (on persistent storage) " \
                                  "that keeps the hospital's privacy ledger"
    config.write_text(f'hospital-id = "h9"\nstate-dir = "{federation.root / "h9"}"\n'
                      f'approved-bundles = "{federation.root / "approvals.txt"}"\n')
    (federation.root / "approvals.txt").write_text("md5:abc\n")
    proc = subprocess.run([sys.executable, "-m", "fl_client.node_launcher", "run", str(config), "--superlink", "x:1",
                           "--root-certificates", "ca", "--auth-supernode-private-key", "k"],
                          cwd=REPO, env=federation.env, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2 and proc.stderr.startswith("fl-node: node setting approved-bundles:")
    assert "line 1: 'md5:abc' is not sha256:<64 hex digits>" in proc.stderr


def test_a_node_whose_key_was_never_registered_is_refused(federation: Federation) -> None:
    intruder = federation.start_node("intruder", data_of="h0")
    assert intruder.wait(timeout=120) != 0
    federation.processes.pop("intruder")
    log = federation.log("intruder")
    assert f"Exit Code: {UNREGISTERED_NODE}" in log and "Failed to activate SuperNode" in log, log[-2000:]


def h2_entry(federation: Federation) -> Entry | None:
    entries = Ledger(federation.state("h2") / "ledger.sqlite").entries("h2")
    return entries[-1] if entries else None


def test_a_node_killed_mid_round_is_survived_and_resumes_its_ledger_after_restart(federation: Federation) -> None:
    """2 rounds of SecAgg+ with DP. h2 dies during round 1's training and restarts; round 2 has it back.

    h2 charges its ledger before training, so round 1 counts against it although its update never left; after the
    restart its run entry continues from disk, and the epsilon it reports in round 2 is that of both rounds.
    """
    root = federation.root
    overrides = [*DATA, "train.device=cpu", "train.batch_size=16", "train.num_threads=1", "train.local_epochs=2",
                 "federation.min_participants=2", "federation.rejoin_timeout=120",
                 "strategy.secagg.reconstruction_threshold=2",
                 f"output_dir={root / 'run'}", f"tracking.mlflow_uri=sqlite:///{root / 'mlflow.db'}"]
    # the rounds and SecAgg+ as typed run-config keys, as a Flower user sets them (fl_core.run_config)
    run = federation.submit(REPO, overrides, "flwr-run", typed={"num-rounds": 2, "secure-aggregation": "on"})

    def charged_rounds() -> int:
        entry = h2_entry(federation)
        if entry is None or entry.status != RESERVED:
            return 0
        return entry.spent.steps * federation_rounds // entry.planned.steps

    run_log = root / "flwr-run.log"

    def running(condition: Callable[[], bool]) -> Callable[[], bool]:
        """`condition`, failing at once with the run's output if the run has ended."""
        def check() -> bool:
            assert run.poll() is None, f"the run ended early:\n{run_log.read_text(errors='replace')[-4000:]}"
            return condition()
        return check

    federation_rounds = 2
    # Polled fast: between the charge and the end of its training h2 has a few seconds (two local epochs).
    wait_until(running(lambda: charged_rounds() == 1), 420, "h2 to start training in round 1", poll=0.1)
    federation.kill("h2")
    wait_until(running(lambda: "[round 1/2]" in run_log.read_text(errors="replace")), 300, "round 1 without h2")
    federation.start_node("h2")
    assert run.wait(timeout=420) == 0, run_log.read_text(errors="replace")[-4000:]
    federation.processes.pop("flwr-run")

    summary = json.loads((root / "run" / "summary.json").read_text())
    assert summary["rounds_completed"] == 2
    client = MlflowClient(tracking_uri=f"sqlite:///{root / 'mlflow.db'}")
    aggregated = [int(m.value) for m in sorted(client.get_metric_history(summary["mlflow_run_id"],
                                                                        "hospitals_aggregated"),
                                               key=lambda m: m.step)]
    assert aggregated == [2, 3]
    per_round = None
    for hospital in HOSPITALS:
        entry = Ledger(federation.state(hospital) / "ledger.sqlite").entry(summary["mlflow_run_id"], hospital, "icd10")
        assert entry is not None and entry.status == COMMITTED
        per_round = per_round or entry.planned.steps // 2
        assert entry.spent.steps == 2 * per_round, hospital  # h2 too: its restart reset nothing
        # What the hospital reported to the server in round 2 is its ledger's whole history.
        assert summary["epsilon_per_client"][hospital] == pytest.approx(entry.epsilon, rel=1e-12)
