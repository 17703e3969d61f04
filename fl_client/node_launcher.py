"""`fl-node`: a hospital's SuperNode, with the node's own installed code in charge of every run.

    fl-node run NODE_CONFIG --superlink HOST:PORT --root-certificates CA --auth-supernode-private-key KEY
    fl-node approve BUNDLE --list FILE [--note TEXT]      # BUNDLE: a .fab file, or the app's folder

`run` checks the node's settings first (a missing state folder, an unreadable approval list: one line naming the
setting, before anything connects), then starts Flower's SuperNode in `process` isolation, so that Flower starts
no ClientApp of its own, and takes Flower's SuperExec's place: it acquires each task over the SuperNode's runtime
API (on loopback, signed with a secret made at start-up, so no other local process can take a task) and starts
`fl_client.runtime` for it, which checks the bundle and runs the installed ClientApp. It exits with the SuperNode's
exit code (305: the SuperLink does not know the node's key).
"""

from __future__ import annotations

import logging
import os
import secrets
import signal
import subprocess
import sys
import time
import tomllib
from pathlib import Path
from types import FrameType

from fl_core.entry import OneLineParser

from .bundles import approve, load_approved
from .node import NodeSettings, NodeSettingsError
from .node_logs import node_logs

SECRET_FILE = "superexec.secret"
POLL_SECONDS = 0.5
MAX_TASKS = 4  # task processes at once (one per message; a SecAgg+ round asks a node one at a time)
ACQUIRE = "/flwr.proto.Runtime/AcquireTask"
log = logging.getLogger("fl-node")


def node_settings(node_config: Path) -> NodeSettings:
    """The node's settings file, checked, its approval list read: every error is one line naming the setting."""
    if node_config.suffix != ".toml":  # Flower's SuperNode reads --node-config as TOML only by this suffix
        raise NodeSettingsError("NODE_CONFIG", f"{node_config}: the node's settings file must end in .toml")
    try:
        raw = tomllib.loads(node_config.read_text())
    except (OSError, tomllib.TOMLDecodeError) as err:
        raise NodeSettingsError("NODE_CONFIG", f"{node_config}: {err}") from None
    settings = NodeSettings.from_node_config(raw)
    load_approved(settings.approved_bundles)
    return settings


def supernode_command(node_config: Path, superlink: str, root_certificates: Path, private_key: Path,
                      runtime_port: int, secret: Path) -> list[str]:
    beside = Path(sys.executable).with_name("flower-supernode")
    return [str(beside) if beside.exists() else "flower-supernode", "--isolation", "process",
            "--superlink", superlink, "--root-certificates", str(root_certificates),
            "--auth-supernode-private-key", str(private_key), "--node-config", str(node_config),
            "--host", "127.0.0.1", "--port", str(runtime_port), "--superexec-auth-secret-file", str(secret)]


def serve_tasks(supernode: subprocess.Popen[bytes], runtime_address: str, secret: bytes, node_config: Path) -> None:
    """What Flower's SuperExec does for a SuperNode, launching this node's task runner instead of Flower's."""
    from flwr.proto.runtime_pb2 import AcquireTaskRequest  # pylint: disable=no-name-in-module
    from flwr.supercore.constant import TaskType
    from flwr.supercore.interceptors import RuntimeVersionHttpInterceptor, SuperExecAuthHttpInterceptor
    from flwr.supercore.runtime import RuntimeHttpClient

    # No retrying client: this loop retries itself, and stops as soon as the SuperNode has exited.
    client = RuntimeHttpClient.from_server_address(
        server_address=runtime_address, insecure=True, root_certificates=None,
        interceptors=[RuntimeVersionHttpInterceptor(component_name="SuperExec"),
                      SuperExecAuthHttpInterceptor(master_secret=secret, protected_methods={ACQUIRE})])
    running: list[subprocess.Popen[bytes]] = []
    try:
        while supernode.poll() is None:
            running = [task for task in running if task.poll() is None]
            if len(running) >= MAX_TASKS:  # the rest wait in the SuperNode: messages cannot exhaust the node
                time.sleep(POLL_SECONDS)
                continue
            try:
                acquired = client.AcquireTask(AcquireTaskRequest(supported_task_types=[TaskType.CLIENT_APP]))
            except Exception:  # the runtime API is not up yet, or is restarting with the SuperNode
                time.sleep(POLL_SECONDS)
                continue
            if acquired.HasField("task") and acquired.token:
                # -P: the working folder (in the image, the node's writable state folder) is not on sys.path
                running.append(subprocess.Popen([sys.executable, "-P", "-m", "fl_client.runtime",
                                                 "--runtime-api-address", runtime_address,
                                                 "--token", acquired.token, "--node-config", str(node_config),
                                                 "--parent-pid", str(os.getpid())]))
            time.sleep(POLL_SECONDS)
    finally:
        client.close()


def run(node_config: Path, superlink: str, root_certificates: Path, private_key: Path, runtime_port: int) -> int:
    settings = node_settings(node_config)
    node_logs(settings, "fl-node", sys.stderr)
    for path, name in ((root_certificates, "--root-certificates"), (private_key, "--auth-supernode-private-key")):
        if not path.is_file():
            raise NodeSettingsError(name, f"no such file {path}")
    settings.state_dir.mkdir(parents=True, exist_ok=True)
    secret_path = settings.state_dir / SECRET_FILE
    secret = secrets.token_bytes(32)
    secret_path.unlink(missing_ok=True)
    fd = os.open(secret_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(secret)
    supernode = subprocess.Popen(supernode_command(node_config, superlink, root_certificates, private_key,
                                                   runtime_port, secret_path))

    def stop(signum: int, _: FrameType | None) -> None:
        supernode.send_signal(signum)

    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, stop)
    log.info("%s (state %s); runs only bundles approved in %s", settings.hospital, settings.state_dir,
             settings.approved_bundles)
    try:
        serve_tasks(supernode, f"127.0.0.1:{runtime_port}", secret, node_config)
    finally:
        if supernode.poll() is None:
            supernode.terminate()
    return supernode.wait()


def main(argv: list[str] | None = None) -> None:
    parser = OneLineParser(prog="fl-node", description="A hospital's SuperNode under its own rules.")
    commands = parser.add_subparsers(dest="command", required=True, parser_class=OneLineParser)
    r = commands.add_parser("run", help="start the node: Flower's SuperNode, tasks run by this node's own code")
    r.add_argument("node_config", type=Path, help="the node's settings (TOML)")
    r.add_argument("--superlink", required=True, help="HOST:PORT")
    r.add_argument("--root-certificates", type=Path, required=True, help="the federation CA")
    r.add_argument("--auth-supernode-private-key", type=Path, required=True, help="the node's key")
    r.add_argument("--runtime-port", type=int, default=9094, help="the SuperNode's runtime API, on loopback")
    a = commands.add_parser("approve", help="add an app bundle's digest to the hospital's approved list")
    a.add_argument("bundle", type=Path, help="a .fab file or the app's folder")
    a.add_argument("--list", type=Path, required=True, help="the approved-bundles file")
    a.add_argument("--note", default="", help="what was approved (release, reviewer)")
    args = parser.parse_args(argv)
    try:
        if args.command == "approve":
            print(approve(args.bundle, args.list, args.note))
            return
        raise SystemExit(run(args.node_config, args.superlink, args.root_certificates,
                             args.auth_supernode_private_key, args.runtime_port))
    except NodeSettingsError as err:
        print(f"fl-node: {err}", file=sys.stderr)
        raise SystemExit(2) from None


if __name__ == "__main__":
    main()
