"""One message of a run on a hospital's node: `fl-node` starts this in place of Flower's `flwr-clientapp`.

Flower's own process installs the app bundle (FAB) that the SuperLink sent and puts it first on `sys.path`, so the
code that enforces the hospital's policy, ledger and DP would be whatever the researcher shipped. This process
pulls the same task input over the SuperNode's runtime API, then, before any code of the run executes:
- checks the bundle's sha256 against the hospital's approved list (node setting `approved-bundles`), and refuses an
  unapproved bundle with one line in the node's log and in the reply the run receives;
- runs the ClientApp installed on the node (`fl_client.client_app`), never the bundle's copy, which is not even
  unpacked.
The reply and the context (SecAgg+ keeps its state there) go back as Flower's own process sends them.
"""

from __future__ import annotations

import argparse
import logging
import sys
import tomllib
from pathlib import Path

from fl_core.logs import log_context

from .node import NodeSettings
from .node_logs import node_logs

log = logging.getLogger("fl-node")


def run_task(runtime_api_address: str, token: str, settings: NodeSettings, parent_pid: int | None) -> int:
    """Execute one task; 0 when the ClientApp answered, 1 when the node refused or the ClientApp failed."""
    from flwr.app import Message
    from flwr.app.error import Error
    from flwr.common.constant import ErrorCode, SubStatus
    from flwr.supercore.app_utils import start_parent_process_monitor
    from flwr.supercore.heartbeat import HeartbeatSender, make_task_heartbeat_fn_http
    from flwr.supercore.interceptors import RuntimeTokenHttpInterceptor, RuntimeVersionHttpInterceptor
    from flwr.supercore.retry import make_simple_http_retry_invoker
    from flwr.supercore.runtime import RuntimeHttpClient
    from flwr.supernode.runtime.run_clientapp import pull_task_input, push_message, push_task_output

    from privacy.ledger import Ledger

    from .bundles import bundle_digest, load_approved
    from .mods import run_id_of
    from .node import NodeSettingsError

    if parent_pid is not None:
        start_parent_process_monitor(parent_pid)
    client = RuntimeHttpClient.from_server_address(
        server_address=runtime_api_address, insecure=True, root_certificates=None,
        interceptors=[RuntimeVersionHttpInterceptor(component_name="flwr-clientapp"),
                      RuntimeTokenHttpInterceptor(token)],
        retry_invoker=make_simple_http_retry_invoker())
    heartbeat = HeartbeatSender(make_task_heartbeat_fn_http(client))
    heartbeat.start()
    context = None
    try:
        message, context, run, fab = pull_task_input(client)
        run_id = run_id_of(message)  # the server's, as in its own log lines; SecAgg+'s stages name none
        with log_context(**({"run_id": run_id} if run_id else {})):
            digest = bundle_digest(fab.content)
            try:
                approved = load_approved(settings.approved_bundles)  # read per task: an approval needs no restart
                refusal = None if digest in approved else (
                    f"app bundle {digest} ({run.fab_id or 'unnamed'} {run.fab_version}) is not approved by this "
                    "hospital (node setting approved-bundles); nothing of the run ran")
            except (NodeSettingsError, OSError, UnicodeDecodeError) as err:
                log.error("%s: the approval list: %s", settings.hospital, err)  # its path and lines stay on the node
                refusal = "this node's list of approved bundles cannot be read (the node's log says why); nothing of " \
                          "the run ran"
            if refusal is not None:
                reason = f"{settings.hospital}: {refusal}"
                log.error("%s", reason)
                Ledger(settings.ledger_path).record_refusal(settings.hospital, "", run_id, run.run_id, refusal)
                reply = Message(Error(code=ErrorCode.CLIENT_APP_RAISED_EXCEPTION, reason=reason), reply_to=message)
                status, details, code = SubStatus.FAILED, reason, 1
            else:
                from .client_app import app  # this node's installed ClientApp, whatever the bundle contains

                try:
                    reply = app(message=message, context=context)
                    status, details, code = SubStatus.COMPLETED, "", 0
                except Exception as err:  # the ClientApp's own guard already made the reason safe to leave
                    reason = str(err)
                    reply = Message(Error(code=ErrorCode.CLIENT_APP_RAISED_EXCEPTION, reason=reason), reply_to=message)
                    status, details, code = SubStatus.FAILED, reason, 1
            push_message(client, reply, context)
            push_task_output(client=client, context=context, sub_status=status, details=details)
            return code
    finally:
        heartbeat.stop()
        client.close()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="fl-clientapp", description="Run one task of a run on this node.")
    parser.add_argument("--runtime-api-address", required=True)
    parser.add_argument("--token", required=True)
    parser.add_argument("--node-config", type=Path, required=True)
    parser.add_argument("--parent-pid", type=int)
    args = parser.parse_args(argv)
    settings = NodeSettings.from_node_config(tomllib.loads(args.node_config.read_text()))
    node_logs(settings, "fl-clientapp", sys.stderr)
    raise SystemExit(run_task(args.runtime_api_address, args.token, settings, args.parent_pid))


if __name__ == "__main__":
    main()
