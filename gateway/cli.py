"""`fl-gateway`: serve (the gateway), replica (a model server behind it), token (mint a clinician or admin JWT).

Each takes Hydra overrides of `conf/gateway/` after its flags; bad input is one line naming the field, exit 2.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import ssl
import sys

import uvicorn

from fl_core.config import ConfigError
from fl_core.data import DataError
from fl_core.entry import OneLineParser, quiet_on_closed_pipe
from fl_core.logs import json_handler, keep_text_out_of_logs
from fl_core.tracing import configure_tracing

from .audit import AuditKeyError
from .config import ROLES, GatewayConfig, compose_gateway_config, secret_from_env
from .http_protocol import with_header_deadline
from .metrics import ACCESS_LOGGER


def _parser() -> argparse.ArgumentParser:
    parser = OneLineParser(prog="fl-gateway", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True, parser_class=OneLineParser)
    serve = sub.add_parser("serve", help="run the gateway (config: conf/gateway, e.g. +preset=production)")
    serve.add_argument("overrides", nargs="*")
    replica = sub.add_parser("replica", help="run one model replica on HOST:PORT")
    replica.add_argument("--host", default="127.0.0.1")
    replica.add_argument("--port", type=int, required=True)
    replica.add_argument("--hospital", default=None, help="this replica serves that hospital's own model "
                                                          "(it votes in noisy-vote queries)")
    replica.add_argument("overrides", nargs="*")
    token = sub.add_parser("token", help="print a JWT signed with the secret in the environment")
    token.add_argument("--user", required=True)
    token.add_argument("--role", required=True, choices=ROLES)
    token.add_argument("--minutes", type=float, default=None, help="lifetime (default: auth.token_minutes)")
    token.add_argument("overrides", nargs="*")
    return parser


def structured_logs(cfg: GatewayConfig, component: str) -> dict[str, object] | None:
    """With log_format json: every log record, uvicorn's too, as a JSON line on stderr, and the gateway's access
    events (route, status, duration, trace id; never a user or text). Returns uvicorn's log_config: None, so its
    loggers reach the root's handler."""
    if cfg.log_format != "json":
        logging.getLogger(ACCESS_LOGGER).setLevel(logging.WARNING)  # no line per request
        return uvicorn.config.LOGGING_CONFIG
    root = logging.getLogger()
    root.handlers[:] = [json_handler(sys.stderr, component)]
    root.setLevel(logging.WARNING)
    logging.getLogger(ACCESS_LOGGER).setLevel(logging.INFO)
    keep_text_out_of_logs()
    return None


def _serve(cfg: GatewayConfig) -> None:
    from .app import build_services, create_gateway_app, create_operations_app

    log_config = structured_logs(cfg, "fl-gateway")
    app = create_gateway_app(build_services(cfg))
    tls = cfg.tls
    # every listener bounds a request's head and a kept-alive connection's idle time
    protocol = with_header_deadline(cfg.limits.header_timeout)
    servers = [uvicorn.Server(uvicorn.Config(
        app, host=cfg.host, port=cfg.port, http=protocol, timeout_keep_alive=cfg.limits.idle_timeout,
        log_level="warning", log_config=log_config, access_log=False, ssl_certfile=tls.certfile,
        ssl_keyfile=tls.keyfile,
        ssl_ca_certs=tls.client_ca, ssl_cert_reqs=ssl.CERT_REQUIRED if tls.client_ca else ssl.CERT_NONE))]
    if cfg.metrics_port is not None:
        servers.append(uvicorn.Server(uvicorn.Config(
            create_operations_app(app), host=cfg.host, port=cfg.metrics_port, http=protocol,
            timeout_keep_alive=cfg.limits.idle_timeout, log_level="warning", log_config=log_config, access_log=False,
            lifespan="off")))
    if not cfg.routing.backends:  # a record: a JSON line with log_format json, else this text on stderr
        logging.getLogger("gateway").warning(
            "fl-gateway: warning: routing.backends is empty: every model request is refused (503) and /ready stays "
            "false until replicas are listed (routing.backends=[http://HOST:PORT,...])")
    print(f"fl-gateway: {'https' if tls.certfile else 'http'}://{cfg.host}:{cfg.port} over "
          f"{len(cfg.routing.backends)} backends{', client certificates required' if tls.client_ca else ''}"
          + (f"; /health /ready /metrics also on http://{cfg.host}:{cfg.metrics_port}" if cfg.metrics_port else ""),
          flush=True)
    asyncio.run(_serve_all(servers))


async def _serve_all(servers: list[uvicorn.Server]) -> None:
    """Both listeners in one event loop; when one stops (a signal reaches only the last to install its handler),
    the other is told to stop too."""
    tasks = [asyncio.create_task(server.serve()) for server in servers]
    await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
    for server in servers:
        server.should_exit = True
    await asyncio.gather(*tasks)


def _replica(cfg: GatewayConfig, host: str, port: int, hospital: str | None) -> None:
    from fl_core.entry import quiet_libraries

    from .replica import create_replica_app
    from .served_model import ServedModel

    quiet_libraries()
    log_config = structured_logs(cfg, "fl-gateway-replica")
    model = ServedModel(cfg.replica)
    print(f"fl-gateway replica: {model.name} ({model.task}) on http://{host}:{port}", flush=True)
    uvicorn.run(create_replica_app(model, hospital), host=host, port=port, log_level="warning",
                log_config=log_config, access_log=False)


@quiet_on_closed_pipe
def main(argv: list[str] | None = None) -> None:
    args = _parser().parse_args(argv)
    try:
        cfg = compose_gateway_config(args.overrides)
        if args.command == "serve":
            configure_tracing("fl-gateway")
            _serve(cfg)
        elif args.command == "replica":
            configure_tracing("fl-gateway-replica")
            _replica(cfg, args.host, args.port, args.hospital)
        else:
            from .auth import mint_token

            secret = secret_from_env(cfg.auth.secret_env, "auth.secret_env")
            minutes = args.minutes if args.minutes is not None else cfg.auth.token_minutes
            if not 0 < minutes <= cfg.auth.token_minutes:
                raise ConfigError("--minutes", f"must be > 0 and at most auth.token_minutes={cfg.auth.token_minutes:g} "
                                               f"(got {minutes:g}); the gateway refuses longer-lived tokens")
            print(mint_token(secret, args.user, args.role, minutes, cfg.auth.issuer))
    except (ConfigError, DataError, AuditKeyError, ValueError) as err:
        print(f"fl-gateway: {err}", file=sys.stderr)
        raise SystemExit(2) from None


if __name__ == "__main__":
    main()
