"""What leaves a hospital's node: every field on the declared list, nothing else, and no error text that could quote
a record. The guard is tried on real Flower messages, then a real run's replies are recorded on their way out."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from flwr.clientapp import ClientApp
from flwr.clientapp.typing import ClientAppCallable
from flwr.common import (
    Code,
    ConfigRecord,
    Context,
    FitRes,
    GetPropertiesRes,
    Message,
    MessageType,
    RecordDict,
    Status,
    ndarrays_to_parameters,
)
from flwr.common.constant import MessageTypeLegacy
from flwr.common.secure_aggregation.secaggplus_constants import RECORD_KEY_CONFIGS, Key, Stage
from flwr.compat.common import recorddict_compat as compat
from flwr.simulation import run_simulation

from fl_client.client_app import client_mods, make_client_fn, run_config
from fl_client.mods import (
    check_reply,
    check_secure_aggregation_setup,
    make_release_guard,
    make_secure_aggregation_as_admitted,
)
from fl_client.node import NodeSettings
from fl_client.plan import secure_aggregation_parameters
from fl_server.server_app import build_server_app
from privacy.governance import Refused
from privacy.ledger import Ledger
from privacy.release import DECLARED, UndeclaredRelease
from tests.conftest import tiny_config

OK = Status(code=Code.OK, message="Success")


@pytest.fixture(autouse=True)
def a_task_of_a_run(monkeypatch: pytest.MonkeyPatch) -> None:
    """Flower gives every message the identity of the process's task: be one, as a ClientApp process is."""
    from flwr.supercore.task_identity import TaskIdentity

    for name in ("_task_id", "_run_id", "_node_id"):
        monkeypatch.setattr(TaskIdentity, name, 1)


def fit_reply(metrics: dict[str, object]) -> Message:
    content = compat.fitres_to_recorddict(FitRes(OK, ndarrays_to_parameters([np.zeros(3, np.float32)]), 10,
                                                 metrics), keep_input=True)  # type: ignore[arg-type]
    return Message(content, dst_node_id=0, message_type=MessageType.TRAIN)


def test_a_reply_with_an_undeclared_field_does_not_leave_the_node() -> None:
    declared = {"hospital": "h0", "epsilon": 1.0, "steps": 10}
    check_reply(fit_reply(declared), MessageType.TRAIN, ())
    with pytest.raises(UndeclaredRelease, match="'patients'"):
        check_reply(fit_reply({**declared, "patients": 412}), MessageType.TRAIN, ())
    with pytest.raises(UndeclaredRelease, match="release_outside_guarantee"):  # the policy must list it
        check_reply(fit_reply({**declared, "train_loss": 0.7}), MessageType.TRAIN, ())
    check_reply(fit_reply({**declared, "train_loss": 0.7}), MessageType.TRAIN, ("train_loss",))
    properties = compat.getpropertiesres_to_recorddict(GetPropertiesRes(OK, {"hospital": "h0"}))
    properties.array_records["weights"] = fit_reply(declared).content.array_records["fitres.parameters"]
    with pytest.raises(UndeclaredRelease, match="'weights'"):
        check_reply(Message(properties, dst_node_id=0, message_type=MessageTypeLegacy.GET_PROPERTIES),
                    MessageTypeLegacy.GET_PROPERTIES, ())
    chatty = fit_reply(declared)
    chatty.content.config_records["fitres.status"]["message"] = "loss of record 17 was 9.2"
    with pytest.raises(UndeclaredRelease, match="status carries a message"):
        check_reply(chatty, MessageType.TRAIN, ())
    with pytest.raises(UndeclaredRelease, match="get_parameters reply record"):  # the adapter, outside a round
        check_reply(Message(RecordDict({"getparametersres.parameters": fit_reply(declared).content.array_records[
            "fitres.parameters"]}), dst_node_id=0, message_type=MessageTypeLegacy.GET_PARAMETERS),
            MessageTypeLegacy.GET_PARAMETERS, ())


def test_the_guard_lets_out_refusals_but_no_other_error_text() -> None:
    guard = make_release_guard(True, lambda context: tiny_config())
    incoming = Message(RecordDict(), dst_node_id=0, message_type=MessageType.TRAIN)
    context = Context(run_id=1, node_id=0, node_config={"partition-id": 0}, state=RecordDict(), run_config={})

    def failing(error: BaseException) -> ClientAppCallable:
        def call(msg: Message, ctx: Context) -> Message:
            raise error
        return call

    with pytest.raises(Refused, match="no open reservation"):
        guard(incoming, context, failing(Refused("hospital-0: no open reservation")))
    with pytest.raises(RuntimeError) as leaked:
        guard(incoming, context, failing(ValueError("text 'Jane Roe, HIV positive' has no label")))
    assert "Jane Roe" not in str(leaked.value) and leaked.value.__suppress_context__ and leaked.value.__cause__ is None
    with pytest.raises(UndeclaredRelease, match=r"hospital-0: .*'patients'"):
        guard(incoming, context, lambda msg, ctx: fit_reply({"hospital": "h0", "patients": 412}))
    # Both refusals decided outside the governance are in the hospital's own history; a generic failure is not one.
    ledger = Ledger(NodeSettings.from_node_config(context.node_config, simulated=True).ledger_path)
    reasons = [str(r["reason"]) for r in ledger.refusals("hospital-0")[-2:]]
    assert "no open reservation" in reasons[0] and "'patients'" in reasons[1]


# Every (message type, record, key) a hospital may send, written out here independently of the guard's table.
FIT_METRICS = {"hospital", "epsilon", "delta", "noise_multiplier", "sample_rate", "steps", "accountant"}
EXPECTED = {
    (MessageType.TRAIN, "fitres.metrics"): FIT_METRICS | {"train_loss"},
    (MessageType.TRAIN, "fitres.num_examples"): {"num_examples"},
    (MessageType.TRAIN, "fitres.status"): {"code", "message"},
    (MessageType.TRAIN, RECORD_KEY_CONFIGS): {"pk1", "pk2", "dsts", "ctxts", "masked_params", "nids", "shares"},
    (MessageType.EVALUATE, "evaluateres.loss"): {"loss"},
    (MessageType.EVALUATE, "evaluateres.num_examples"): {"num_examples"},
    (MessageType.EVALUATE, "evaluateres.metrics"): {"hospital", "accuracy"},
    (MessageType.EVALUATE, "evaluateres.status"): {"code", "message"},
    (MessageTypeLegacy.GET_PROPERTIES, "getpropertiesres.properties"): {
        "hospital", "admitted", "planned_epsilon", "num_examples", "num_test_examples", "outside_guarantee", "status",
        "epsilon", "accountant", "lifetime_epsilon", "lifetime_delta", "summed_epsilon"},
    (MessageTypeLegacy.GET_PROPERTIES, "getpropertiesres.status"): {"code", "message"},
}


@pytest.mark.slow
def test_every_field_a_hospital_sends_in_a_real_run_is_declared(tmp_path: Path,
                                                                monkeypatch: pytest.MonkeyPatch) -> None:
    """Two rounds with SecAgg+, federated evaluation, and hospital-0's policy releasing its training loss."""
    home = tmp_path / "nodes"
    (home / "hospital-0").mkdir(parents=True)
    (home / "hospital-0" / "policy.yaml").write_text("release_outside_guarantee: [train_loss]\n")
    monkeypatch.setenv("FEDERATED_DP_LLM_NODE_HOME", str(home))
    sent = tmp_path / "sent"
    sent.mkdir()
    overrides = ["model=tiny", "data.max_train_examples=300", "data.max_test_examples=90", "train.batch_size=32",
                 "train.device=cpu", "train.num_threads=1", "federation.num_rounds=2",
                 "strategy.federated_evaluation=true", f"output_dir={tmp_path / 'run'}",
                 f"tracking.mlflow_uri=sqlite:///{tmp_path / 'mlflow.db'}"]

    def record_what_leaves(msg: Message, context: Context, call_next: ClientAppCallable) -> Message:
        reply = call_next(msg, context)
        records = {} if reply.has_error() else {
            name: sorted(record) for name, record in [*reply.content.array_records.items(),
                                                      *reply.content.metric_records.items(),
                                                      *reply.content.config_records.items()]}
        with (sent / f"{context.node_config['partition-id']}.jsonl").open("a") as log:
            log.write(json.dumps({"type": msg.metadata.message_type, "records": records,
                                  "error": reply.has_error()}) + "\n")
        return reply

    client = ClientApp(client_fn=make_client_fn(overrides), mods=[record_what_leaves, *client_mods(overrides)])
    run_simulation(server_app=build_server_app(overrides), client_app=client, num_supernodes=3,
                   backend_config={"client_resources": {"num_cpus": 1}})
    assert json.loads((tmp_path / "run" / "summary.json").read_text())["rounds_completed"] == 2

    seen: dict[int, set[tuple[str, str, str]]] = {}
    for p in range(3):
        lines = [json.loads(line) for line in (sent / f"{p}.jsonl").read_text().splitlines()]
        assert not any(line["error"] for line in lines)  # an honest run: every request answered
        seen[p] = {(line["type"], name, key) for line in lines for name, keys in line["records"].items()
                   for key in keys}
        for message_type, name, key in seen[p]:
            if name == "fitres.parameters":
                assert message_type == MessageType.TRAIN  # the adapter leaves only as a round's result
                continue
            assert key in EXPECTED[message_type, name], (p, message_type, name, key)
            field_message = {"fitres.metrics": "fit", "evaluateres.metrics": "evaluate",
                             "getpropertiesres.properties": "properties"}.get(name)
            if field_message is not None:
                assert (field_message, key) in DECLARED  # and on the product's declared list
    assert (MessageType.TRAIN, "fitres.metrics", "train_loss") in seen[0]  # hospital-0's policy allows it
    assert not any(key == "train_loss" for p in (1, 2) for _, _, key in seen[p])  # the others keep it
    assert any(name == RECORD_KEY_CONFIGS and key == "masked_params" for _, name, key in seen[1])  # SecAgg+ ran


def test_a_secure_aggregation_setup_other_than_the_admitted_one_is_refused() -> None:
    admitted = secure_aggregation_parameters(tiny_config())  # 3 hospitals, shares 1.0, threshold 0.67
    setup = {Key.CLIPPING_RANGE: admitted["clipping_range"], Key.TARGET_RANGE: admitted["quantization_range"],
             Key.MOD_RANGE: admitted["modulus_range"], Key.MAX_WEIGHT: admitted["max_weight"],
             Key.SHARE_NUMBER: 3, Key.THRESHOLD: 2}
    check_secure_aggregation_setup(setup, admitted)
    for change, reason in (({Key.SHARE_NUMBER: 2, Key.THRESHOLD: 2}, "2 shares is below the admitted 1.0"),
                           ({Key.THRESHOLD: 1}, "threshold 1 of 3 shares is below"),
                           ({Key.CLIPPING_RANGE: 2 * admitted["clipping_range"]}, "clipping_range")):
        with pytest.raises(Refused, match=reason):
            check_secure_aggregation_setup({**setup, **change}, admitted)


@pytest.mark.parametrize("override", ["data.name=${oc.env:HOME}", "data.name=$\\{oc.env:HOME\\}",
                                      "privacy.noise_multiplier=${oc.env:SECRET_NUMBER}"])
def test_a_run_config_that_would_resolve_on_the_node_is_refused(override: str) -> None:
    context = Context(run_id=1, node_id=0, node_config={}, state=RecordDict(),
                      run_config={"overrides": f"model=tiny '{override}'"})
    with pytest.raises(Refused, match="may not interpolate"):
        run_config(context, None)


def test_key_sharing_with_fewer_nodes_than_admitted_is_refused() -> None:
    mod = make_secure_aggregation_as_admitted(lambda context: tiny_config())  # 3 hospitals: at least 3 shares
    context = Context(run_id=1, node_id=0, node_config={}, state=RecordDict(), run_config={})
    few = RecordDict({RECORD_KEY_CONFIGS: ConfigRecord({Key.STAGE: Stage.SHARE_KEYS, "1": [b"a", b"b"],
                                                        "2": [b"c", b"d"]})})
    with pytest.raises(Refused, match="2 nodes share keys, fewer than the admitted 3"):
        mod(Message(few, dst_node_id=0, message_type=MessageType.TRAIN), context,
            lambda msg, ctx: pytest.fail("the round went on"))
