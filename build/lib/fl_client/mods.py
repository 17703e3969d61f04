"""The node's ClientApp mods, outermost first: the release guard, SecAgg+ as admitted, hospital-level clipping.

- `release_guard` is the last code every reply passes on its way out. Each record and key must be on the declared
  release list (`privacy.release`) or be Flower's own SecAgg+ protocol; anything else becomes a refusal and does not
  leave. An exception's text leaves only if it is the node's own refusal: any other failure says only that the
  ClientApp failed, and its details stay in the node's log (an error message must not carry a record).
- `secure_aggregation_as_admitted`: a run whose plan uses SecAgg+ gets its training only through SecAgg+, set up
  with the admitted clipping, quantisation, modulus and weight, and at least the admitted reconstruction threshold.
- `hospital_level_clipping`: Flower's `fixedclipping_mod`, at the admitted clipping norm only.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Sequence

from flwr.client.mod import fixedclipping_mod, secaggplus_mod
from flwr.clientapp.typing import ClientAppCallable, Mod
from flwr.common import Context, Message, MessageType
from flwr.common.constant import MessageTypeLegacy
from flwr.common.secure_aggregation.secaggplus_constants import RECORD_KEY_CONFIGS, Key, Stage
from flwr.supercore.differential_privacy import KEY_CLIPPING_NORM

from fl_core.config import AppConfig
from fl_core.protocol import RUN_ID
from privacy.governance import Refused
from privacy.ledger import Ledger
from privacy.policy import PolicyError, load_policy
from privacy.release import EVALUATE, FIT, PROPERTIES, UndeclaredRelease, check_field

from .node import NodeSettings
from .plan import secure_aggregation_parameters

log = logging.getLogger(__name__)
ConfigFor = Callable[[Context], AppConfig]

# Flower's records in each reply: (record name, the declared message its keys belong to, or the fixed keys it has).
STATUS_KEYS = frozenset({"code", "message"})
SECAGG_REPLY_KEYS = frozenset({Key.PUBLIC_KEY_1, Key.PUBLIC_KEY_2, Key.DESTINATION_LIST, Key.CIPHERTEXT_LIST,
                               Key.MASKED_PARAMETERS, Key.NODE_ID_LIST, Key.SHARE_LIST})
DECLARED_RECORDS: dict[str, dict[str, str | frozenset[str]]] = {
    MessageType.TRAIN: {"fitres.metrics": FIT, "fitres.num_examples": frozenset({"num_examples"}),
                        "fitres.parameters": frozenset(), "fitres.status": STATUS_KEYS,
                        RECORD_KEY_CONFIGS: SECAGG_REPLY_KEYS},
    MessageType.EVALUATE: {"evaluateres.metrics": EVALUATE, "evaluateres.loss": frozenset({"loss"}),
                           "evaluateres.num_examples": frozenset({"num_examples"}),
                           "evaluateres.status": STATUS_KEYS},
    MessageTypeLegacy.GET_PROPERTIES: {"getpropertiesres.properties": PROPERTIES,
                                       "getpropertiesres.status": STATUS_KEYS},
}  # a get_parameters reply has nothing declared: the node's adapter leaves only as a round's result


def check_reply(reply: Message, message_type: str, allowed_outside: Sequence[str]) -> None:
    """Raise UndeclaredRelease unless every record and key of `reply` is declared for `message_type`."""
    declared = DECLARED_RECORDS.get(message_type, {})
    content = reply.content
    keyed: list[tuple[str, list[str]]] = [(n, [] if n == "fitres.parameters" else list(r))
                                          for n, r in content.array_records.items()]
    keyed += [(n, list(r)) for n, r in content.metric_records.items()]
    keyed += [(n, list(r)) for n, r in content.config_records.items()]
    for name, keys in keyed:
        if name not in declared:
            raise UndeclaredRelease(f"{message_type} reply record {name!r} is not a declared release; it does not "
                                    "leave the node")
        spec = declared[name]
        for key in keys:
            if isinstance(spec, str):
                check_field(spec, key, allowed_outside)
            elif key not in spec:
                raise UndeclaredRelease(f"{message_type} reply record {name!r} carries undeclared key {key!r}")
    for name, status in content.config_records.items():
        if name.endswith(".status") and status.get("message") not in ("Success", ""):
            raise UndeclaredRelease(f"{message_type} reply status carries a message; it does not leave the node")
    if set(content.array_records) - {"fitres.parameters"} or (content.array_records and
                                                              message_type != MessageType.TRAIN):
        raise UndeclaredRelease(f"a {message_type} reply carries arrays; only a training round's adapter leaves")


def run_id_of(msg: Message) -> str:
    """The ledger run id the server's message names, if any (for the refusal's record)."""
    for record in msg.content.config_records.values():
        if RUN_ID in record:
            return str(record[RUN_ID])
    return ""


def record_refusal(node: NodeSettings, config_for: ConfigFor, msg: Message, context: Context, reason: str) -> None:
    """A refusal decided outside the governance (a mod's check, the guard itself) goes in the ledger too."""
    try:
        dataset = config_for(context).data.name
    except Exception:  # the run's config itself was refused: no dataset to file it under
        dataset = ""
    try:
        Ledger(node.ledger_path).record_refusal(node.hospital, dataset, run_id_of(msg), context.run_id, reason)
    except Exception:  # the refusal still stands and still leaves as it is; the failure stays in the node's log
        log.exception("%s: could not record a refusal in the ledger", node.hospital)


def make_release_guard(simulated: bool, config_for: ConfigFor) -> Mod:
    def release_guard(msg: Message, context: Context, call_next: ClientAppCallable) -> Message:
        node = NodeSettings.from_node_config(context.node_config, simulated=simulated)
        try:
            reply = call_next(msg, context)
        except Refused as err:
            log.warning("%s", err)
            if not err.recorded:
                record_refusal(node, config_for, msg, context, str(err))
            raise
        except Exception:
            log.exception("%s: the ClientApp failed on a %s message", node.hospital, msg.metadata.message_type)
            # `from None`: the error that leaves carries no trace of the one that stays (it may quote data)
            raise RuntimeError(f"{node.hospital}: the ClientApp failed; the reason stays in the node's log") from None
        if reply.has_error():
            return reply  # an error reply from within (a mod's refusal): Flower's Error, its reason already ours
        try:
            allowed = load_policy(node.policy_file).release_outside_guarantee
        except PolicyError:
            allowed = []
        try:
            check_reply(reply, msg.metadata.message_type, allowed)
        except UndeclaredRelease as err:
            log.error("%s: %s", node.hospital, err)
            record_refusal(node, config_for, msg, context, str(err))
            raise UndeclaredRelease(f"{node.hospital}: {err}") from None
        return reply

    return release_guard


def make_secure_aggregation_as_admitted(config_for: ConfigFor) -> Mod:
    def secure_aggregation_as_admitted(msg: Message, context: Context, call_next: ClientAppCallable) -> Message:
        cfg = config_for(context)
        if not cfg.strategy.secagg.enabled or msg.metadata.message_type != MessageType.TRAIN:
            return call_next(msg, context)
        configs = msg.content.config_records.get(RECORD_KEY_CONFIGS)
        if configs is None:
            raise Refused("this run's admitted plan uses SecAgg+: a plaintext training request is refused")
        if configs.get(Key.STAGE) == Stage.SETUP:
            check_secure_aggregation_setup(dict(configs), secure_aggregation_parameters(cfg))
        elif configs.get(Key.STAGE) == Stage.SHARE_KEYS:  # Flower checks the neighbours only against the threshold
            neighbours = len([k for k in configs if k != Key.STAGE])  # this node included
            fewest = secure_aggregation_parameters(cfg)["fewest_shares"]
            if neighbours < fewest:
                raise Refused(f"SecAgg+ key sharing: {neighbours} nodes share keys, fewer than the admitted "
                              f"{fewest:g}")
        return secaggplus_mod(msg, context, call_next)

    return secure_aggregation_as_admitted


def check_secure_aggregation_setup(setup: dict[str, object], admitted: dict[str, float]) -> None:
    """The server's SecAgg+ setup must be the admitted one, its threshold no lower than the admitted one gives."""
    for key, name in ((Key.CLIPPING_RANGE, "clipping_range"), (Key.TARGET_RANGE, "quantization_range"),
                      (Key.MOD_RANGE, "modulus_range"), (Key.MAX_WEIGHT, "max_weight")):
        if float(setup.get(key, math.nan)) != float(admitted[name]):  # type: ignore[arg-type]
            raise Refused(f"SecAgg+ setup: {name} {setup.get(key)} is not the admitted {admitted[name]}")
    shares, threshold = int(setup[Key.SHARE_NUMBER]), int(setup[Key.THRESHOLD])  # type: ignore[call-overload]
    if shares < admitted["fewest_shares"]:  # with few shares, one neighbour and the server unmask an update
        raise Refused(f"SecAgg+ setup: {shares} shares is below the admitted {admitted['num_shares']} (at least "
                      f"{admitted['fewest_shares']:g})")
    wanted = admitted["reconstruction_threshold"]
    least = max(round(wanted * shares), 2) if isinstance(wanted, float) else int(wanted)
    if threshold < least:
        raise Refused(f"SecAgg+ setup: reconstruction threshold {threshold} of {shares} shares is below the "
                      f"admitted {wanted} (at least {least})")


def make_hospital_level_clipping(config_for: ConfigFor) -> Mod:
    def hospital_level_clipping(msg: Message, context: Context, call_next: ClientAppCallable) -> Message:
        cfg = config_for(context)
        if not cfg.privacy.client_level.enabled or msg.metadata.message_type != MessageType.TRAIN:
            return call_next(msg, context)
        fit_config = msg.content.config_records.get("fitins.config")
        asked = fit_config.get(KEY_CLIPPING_NORM) if fit_config is not None else None
        if not isinstance(asked, int | float) or float(asked) != cfg.privacy.client_level.clipping_norm:
            raise Refused(f"hospital-level DP: the round asks for clipping norm {asked!r}, the admitted plan has "
                          f"{cfg.privacy.client_level.clipping_norm}")
        return fixedclipping_mod(msg, context, call_next)

    return hospital_level_clipping
