"""Set up and start a real federation: one SuperLink and one SuperNode per hospital, over TLS with node auth.

    python -m scripts.federation init DIR --hospitals H1 H2 H3 [--dns superlink.example.org]
    python -m scripts.federation connect NAME ADDRESS --ca DIR/ca.crt       # the researcher's `flwr` config
    python -m scripts.federation superlink DIR [--port 9092] [--state DIR/superlink]
    python -m scripts.federation register DIR NAME                         # once the SuperLink is up
    python -m scripts.federation partition DATA --hospitals H1 H2 H3 [--overrides "data.max_train_examples=..."]
    python -m scripts.federation supernode DIR HOSPITAL --superlink HOST:PORT --data-dir DATA/H1 [--policy-file F]
        [--approved-bundles FILE]                                            # runs `fl-node run`

`init` makes what a federation's operator hands out: a CA, the SuperLink's server certificate (SANs for 127.0.0.1,
localhost and `--dns`) and one ECDSA key pair per hospital, in OpenSSH format as Flower's node auth expects. Private
keys are written 0600 and never overwritten: running `init` again with more hospitals only adds their keys.
`partition` gives each hospital of a trial federation its share of the packaged data as its own files (a real
hospital writes its records in the same format: `train.jsonl` and `test.jsonl`, one {"text", "label"} per line).
`superlink` replaces itself with Flower's SuperLink and `supernode` with `fl-node` (exec), so signals reach them
directly; a node runs only the app bundles its hospital approved (`fl-node approve`, listed in `--approved-bundles`,
default STATE/approved-bundles.txt).
"""

from __future__ import annotations

import argparse
import datetime
import ipaddress
import os
import re
import shlex
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from fl_core.config import ConfigError, compose_config, to_app_config
from fl_core.data import TEST_FILE, TRAIN_FILE, DataError, hospital_share, write_examples

CA_CERT, CA_KEY = "ca.crt", "ca.key"
SERVER_CERT, SERVER_KEY = "superlink.crt", "superlink.key"
NODE_KEY, NODE_PUBLIC_KEY, NODE_CONFIG = "node.key", "node.pub", "node.toml"
HOSPITAL_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,62}$")
NO_DEPENDENCY_INSTALL = {"FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1"}


class SetupError(ValueError):
    """Bad input to a set-up command; the message names the argument."""


def flower_command(name: str) -> str:
    """Flower's console script from this interpreter's environment, so an unactivated .venv works too."""
    beside = Path(sys.executable).with_name(name)
    return str(beside) if beside.exists() else name


def flower_environment() -> dict[str, str]:
    """Flower starts its own helpers (SuperExec, ServerApp and ClientApp processes) by name: find them here too."""
    path = os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", "")])
    return {**os.environ, "PATH": path, **NO_DEPENDENCY_INSTALL}


def node_dir(certs: Path, hospital: str) -> Path:
    return certs / "nodes" / hospital


def _write_private(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(data)


def _pem_key(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


def _name(common_name: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, "federated-dp-llm"),
                      x509.NameAttribute(NameOID.COMMON_NAME, common_name)])


def _certificate(subject: x509.Name, issuer: x509.Name, public_key: ec.EllipticCurvePublicKey,
                 signer: ec.EllipticCurvePrivateKey, days: int) -> x509.CertificateBuilder:
    now = datetime.datetime.now(datetime.UTC)
    return (x509.CertificateBuilder().subject_name(subject).issuer_name(issuer).public_key(public_key)
            .serial_number(x509.random_serial_number()).not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(days=days)))


def create_ca(certs: Path, days: int) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    key = ec.generate_private_key(ec.SECP384R1())
    name = _name("federated-dp-llm federation CA")
    cert = (_certificate(name, name, key.public_key(), key, days)
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .add_extension(x509.KeyUsage(digital_signature=False, content_commitment=False, key_encipherment=False,
                                         data_encipherment=False, key_agreement=False, key_cert_sign=True,
                                         crl_sign=True, encipher_only=False, decipher_only=False), critical=True)
            .sign(key, hashes.SHA384()))
    _write_private(certs / CA_KEY, _pem_key(key))
    (certs / CA_CERT).write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    return cert, key


def load_ca(certs: Path) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    cert = x509.load_pem_x509_certificate((certs / CA_CERT).read_bytes())
    key = serialization.load_pem_private_key((certs / CA_KEY).read_bytes(), password=None)
    if not isinstance(key, ec.EllipticCurvePrivateKey):
        raise SetupError(f"{certs / CA_KEY}: not an ECDSA key")
    return cert, key


def create_server_certificate(certs: Path, dns_names: Sequence[str], days: int, stem: str = "superlink") -> None:
    """A server's certificate (the SuperLink's, or the gateway's with stem "gateway"): valid for loopback (tests,
    one-machine trials) and its DNS names."""
    ca_cert, ca_key = load_ca(certs)
    key = ec.generate_private_key(ec.SECP384R1())
    names: list[x509.GeneralName] = [x509.IPAddress(ipaddress.ip_address("127.0.0.1")), x509.DNSName("localhost")]
    names += [x509.DNSName(d) for d in dns_names if d != "localhost"]
    cert = (_certificate(_name(dns_names[0] if dns_names else "localhost"), ca_cert.subject, key.public_key(),
                         ca_key, days)
            .add_extension(x509.SubjectAlternativeName(names), critical=False)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
            .sign(ca_key, hashes.SHA384()))
    _write_private(certs / f"{stem}.key", _pem_key(key))
    (certs / f"{stem}.crt").write_bytes(cert.public_bytes(serialization.Encoding.PEM))


def create_client_certificate(certs: Path, name: str, days: int) -> tuple[Path, Path]:
    """A client certificate from the federation CA, for a system that calls the gateway with mTLS (an EHR, a
    Prometheus): CERTS/clients/NAME.crt and NAME.key (0600)."""
    check_hospitals([name])
    ca_cert, ca_key = load_ca(certs)
    key = ec.generate_private_key(ec.SECP384R1())
    cert = (_certificate(_name(name), ca_cert.subject, key.public_key(), ca_key, days)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.CLIENT_AUTH]), critical=False)
            .sign(ca_key, hashes.SHA384()))
    folder = certs / "clients"
    folder.mkdir(parents=True, exist_ok=True)
    _write_private(folder / f"{name}.key", _pem_key(key))
    (folder / f"{name}.crt").write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    return folder / f"{name}.crt", folder / f"{name}.key"


def create_node_keys(certs: Path, hospital: str) -> None:
    """ECDSA P-384 key pair in OpenSSH format: the private key stays on the hospital's node."""
    key = ec.generate_private_key(ec.SECP384R1())
    folder = node_dir(certs, hospital)
    _write_private(folder / NODE_KEY, key.private_bytes(serialization.Encoding.PEM,
                                                        serialization.PrivateFormat.OpenSSH,
                                                        serialization.NoEncryption()))
    public = key.public_key().public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH)
    (folder / NODE_PUBLIC_KEY).write_bytes(public + f" {hospital}\n".encode())


def check_hospitals(hospitals: Sequence[str]) -> None:
    for h in hospitals:
        if not HOSPITAL_ID.match(h):
            raise SetupError(f"--hospitals: {h!r} is not a hospital id (letters, digits, '_', '.', '-'; at most 63)")
    if len(set(hospitals)) != len(hospitals):
        raise SetupError("--hospitals: a hospital id is listed twice")


def init(certs: Path, hospitals: Sequence[str], dns_names: Sequence[str], days: int) -> list[Path]:
    """Create whatever is missing; existing keys and certificates are kept. Returns the files it wrote."""
    check_hospitals(hospitals)
    if days < 1:
        raise SetupError(f"--days: must be at least 1, got {days}")
    before = {p for p in certs.rglob("*") if p.is_file()} if certs.exists() else set()
    certs.mkdir(parents=True, exist_ok=True)
    if not (certs / CA_KEY).exists():
        create_ca(certs, days)
    if not (certs / SERVER_KEY).exists():
        create_server_certificate(certs, dns_names, days)
    for hospital in hospitals:
        if not (node_dir(certs, hospital) / NODE_KEY).exists():
            create_node_keys(certs, hospital)
    return sorted(p for p in certs.rglob("*") if p.is_file() and p not in before)


def flwr_home() -> Path:
    return Path(os.environ.get("FLWR_HOME", Path.home() / ".flwr"))


def connect(name: str, address: str, ca_cert: Path) -> Path:
    """Add (or update) a SuperLink connection in the researcher's Flower config; other entries are kept."""
    import tomli
    import tomli_w

    if not ca_cert.is_file():
        raise SetupError(f"--ca: no such file {ca_cert}")
    path = flwr_home() / "config.toml"
    config = tomli.loads(path.read_text()) if path.exists() else {}
    links = config.setdefault("superlink", {})
    links[name] = {"address": address, "root-certificates": str(ca_cert.resolve())}
    links.setdefault("default", name)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(tomli_w.dumps(config))
    return path


def register_command(certs: Path, hospital: str, federation: str) -> list[str]:
    public_key = node_dir(certs, hospital) / NODE_PUBLIC_KEY
    return [flower_command("flwr"), "supernode", "register", str(public_key), federation, "--name", hospital]


def registered_hospitals(certs: Path) -> list[str]:
    return sorted(p.parent.name for p in (certs / "nodes").glob(f"*/{NODE_PUBLIC_KEY}"))


def _require_file(path: Path, argument: str) -> Path:
    if not path.is_file():
        raise SetupError(f"{argument}: no such file {path}")
    return path


def superlink_command(certs: Path, state: Path, host: str, port: int) -> list[str]:
    """TLS, node authentication, a persistent state database, and the installed environment (no `uv sync`)."""
    return [flower_command("flower-superlink"), "--ssl-ca-certfile", str(_require_file(certs / CA_CERT, "certs")),
            "--ssl-certfile", str(_require_file(certs / SERVER_CERT, "certs")),
            "--ssl-keyfile", str(_require_file(certs / SERVER_KEY, "certs")),
            "--enable-supernode-auth", "--database", str(state / "superlink.db"),
            "--disable-runtime-dependency-installation", "--host", host, "--port", str(port)]


def write_partitions(data_root: Path, hospitals: Sequence[str], overrides: Sequence[str]) -> list[Path]:
    """Each hospital's share of the packaged data, split as a simulation of these overrides would split it."""
    check_hospitals(hospitals)
    cfg = to_app_config(compose_config([*overrides, f"federation.num_clients={len(hospitals)}"]))
    written = []
    for partition, hospital in enumerate(hospitals):
        share = hospital_share(cfg.data, cfg.federation, partition)
        for name, data in ((TRAIN_FILE, share.train), (TEST_FILE, share.test)):
            write_examples(data_root / hospital / name, data)
            written.append(data_root / hospital / name)
    return written


def write_node_config(certs: Path, hospital: str, state: Path, data_dir: Path, policy_file: Path | None,
                      approved_bundles: Path) -> Path:
    """The node's own settings as a TOML file; nothing in it comes from the researcher who submits runs."""
    import tomli_w

    if not data_dir.is_dir():
        raise SetupError(f"--data-dir: no such folder {data_dir}")
    config: dict[str, str] = {"hospital-id": hospital, "state-dir": str(state.resolve()),
                              "data-dir": str(data_dir.resolve()),
                              "approved-bundles": str(_require_file(approved_bundles, "--approved-bundles").resolve())}
    if policy_file is not None:
        config["policy-file"] = str(_require_file(policy_file, "--policy-file").resolve())
    path = node_dir(certs, hospital) / NODE_CONFIG
    path.write_text(tomli_w.dumps(config))
    return path


def supernode_command(certs: Path, hospital: str, superlink: str, node_config: Path, clientapp_port: int) -> list[str]:
    """`fl-node run`; `clientapp_port`: the node's local runtime API for its tasks, distinct per node on one machine."""
    return [sys.executable, "-m", "fl_client.node_launcher", "run", str(node_config), "--superlink", superlink,
            "--root-certificates", str(_require_file(certs / CA_CERT, "certs")),
            "--auth-supernode-private-key", str(_require_file(node_dir(certs, hospital) / NODE_KEY, "HOSPITAL")),
            "--runtime-port", str(clientapp_port)]


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m scripts.federation", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True)
    i = sub.add_parser("init", help="CA, SuperLink certificate and hospital node keys")
    i.add_argument("certs", type=Path)
    i.add_argument("--hospitals", nargs="+", required=True)
    i.add_argument("--dns", nargs="*", default=[], help="DNS names of the SuperLink besides localhost")
    i.add_argument("--days", type=int, default=365)
    g = sub.add_parser("gateway-cert", help="the inference gateway's TLS certificate (gateway.crt), signed by the CA")
    g.add_argument("certs", type=Path)
    g.add_argument("--dns", nargs="*", default=[], help="DNS names of the gateway besides localhost")
    g.add_argument("--days", type=int, default=365)
    k = sub.add_parser("client-cert", help="a client certificate for the gateway's mTLS, signed by the CA")
    k.add_argument("certs", type=Path)
    k.add_argument("name")
    k.add_argument("--days", type=int, default=365)
    c = sub.add_parser("connect", help="add the SuperLink to this machine's Flower config ($FLWR_HOME/config.toml)")
    c.add_argument("name")
    c.add_argument("address", help="HOST:PORT of the SuperLink")
    c.add_argument("--ca", type=Path, required=True)
    r = sub.add_parser("register", help="register hospitals' public keys with a running SuperLink")
    r.add_argument("certs", type=Path)
    r.add_argument("federation", help="the connection name given to `connect`")
    r.add_argument("--hospitals", nargs="*", help="default: every hospital with a key under CERTS/nodes")
    d = sub.add_parser("partition", help="write each hospital's share of the packaged data as its own files")
    d.add_argument("data", type=Path)
    d.add_argument("--hospitals", nargs="+", required=True)
    d.add_argument("--overrides", default="", help="Hydra overrides, as for the run (data size, partitioning)")
    s = sub.add_parser("superlink", help="start the SuperLink (TLS, node auth, persistent state)")
    s.add_argument("certs", type=Path)
    s.add_argument("--state", type=Path, help="folder for the SuperLink's database (default CERTS/../superlink)")
    s.add_argument("--host", default="127.0.0.1")
    s.add_argument("--port", type=int, default=9092)
    n = sub.add_parser("supernode", help="start one hospital's SuperNode")
    n.add_argument("certs", type=Path)
    n.add_argument("hospital")
    n.add_argument("--superlink", required=True, help="HOST:PORT")
    n.add_argument("--state", type=Path, help="the node's ledger and policy folder (default CERTS/../state/HOSPITAL)")
    n.add_argument("--data-dir", type=Path, required=True, help="the hospital's train.jsonl and test.jsonl")
    n.add_argument("--policy-file", type=Path)
    n.add_argument("--approved-bundles", type=Path, help="the app bundles the hospital approved (fl-node approve); "
                                                         "default STATE/approved-bundles.txt")
    n.add_argument("--clientapp-port", type=int, default=9094)
    return p


def run(argv: Sequence[str] | None = None) -> None:
    args = _parser().parse_args(argv)
    certs: Path = getattr(args, "certs", Path())
    if args.command == "init":
        for path in init(certs, args.hospitals, args.dns, args.days):
            print(path)
    elif args.command == "gateway-cert":
        _require_file(certs / CA_KEY, "CERTS")
        if args.days < 1:
            raise SetupError(f"--days: must be at least 1, got {args.days}")
        create_server_certificate(certs, args.dns, args.days, stem="gateway")
        print(certs / "gateway.crt")
    elif args.command == "client-cert":
        _require_file(certs / CA_KEY, "CERTS")
        for path in create_client_certificate(certs, args.name, args.days):
            print(path)
    elif args.command == "connect":
        print(connect(args.name, args.address, args.ca))
    elif args.command == "register":
        hospitals = args.hospitals or registered_hospitals(certs)
        check_hospitals(hospitals)
        for hospital in hospitals:
            subprocess.run(register_command(certs, hospital, args.federation), check=True, env=flower_environment())
    elif args.command == "partition":
        for path in write_partitions(args.data, args.hospitals, shlex.split(args.overrides)):
            print(path)
    elif args.command == "superlink":
        state = args.state or certs.resolve().parent / "superlink"
        command = superlink_command(certs, state, args.host, args.port)
        state.mkdir(parents=True, exist_ok=True)
        os.execvpe(command[0], command, flower_environment())
    elif args.command == "supernode":
        check_hospitals([args.hospital])
        state = args.state or certs.resolve().parent / "state" / args.hospital
        _require_file(node_dir(certs, args.hospital) / NODE_KEY, "HOSPITAL")
        config = write_node_config(certs, args.hospital, state, args.data_dir, args.policy_file,
                                   args.approved_bundles or state / "approved-bundles.txt")
        command = supernode_command(certs, args.hospital, args.superlink, config, args.clientapp_port)
        state.mkdir(parents=True, exist_ok=True)
        os.execvpe(command[0], command, flower_environment())


def main(argv: Sequence[str] | None = None) -> None:
    try:
        run(argv)
    except (SetupError, ConfigError, DataError) as err:
        print(f"federation: {err}", file=sys.stderr)
        raise SystemExit(2) from None
    except subprocess.CalledProcessError as err:
        print(f"federation: {' '.join(err.cmd)} failed with exit code {err.returncode}", file=sys.stderr)
        raise SystemExit(err.returncode) from None


if __name__ == "__main__":
    main()
