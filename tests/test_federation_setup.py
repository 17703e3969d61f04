"""Federation set-up without processes: certificates, node keys, the researcher's Flower config, bad input."""

from __future__ import annotations

import ipaddress
import os
import stat
import subprocess
import sys
import tomllib
import zipfile
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from fl_client.bundles import approve, bundle_digest, load_approved
from fl_core.config import ConfigError
from scripts.federation import (
    SetupError,
    connect,
    init,
    main,
    superlink_command,
    write_node_config,
    write_partitions,
)


def test_certificates_chain_to_the_ca_and_name_loopback_and_the_dns_name(tmp_path: Path) -> None:
    init(tmp_path, ["h0"], ["superlink.hospitals.example"], days=30)
    ca = x509.load_pem_x509_certificate((tmp_path / "ca.crt").read_bytes())
    server = x509.load_pem_x509_certificate((tmp_path / "superlink.crt").read_bytes())
    server.verify_directly_issued_by(ca)
    sans = server.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert sans.get_values_for_type(x509.IPAddress) == [ipaddress.ip_address("127.0.0.1")]
    assert sans.get_values_for_type(x509.DNSName) == ["localhost", "superlink.hospitals.example"]
    assert ca.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    assert not server.extensions.get_extension_for_class(x509.BasicConstraints).value.ca


def test_node_keys_are_openssh_ecdsa_pairs_readable_only_by_their_owner(tmp_path: Path) -> None:
    init(tmp_path, ["h0"], [], days=30)
    private = serialization.load_ssh_private_key((tmp_path / "nodes/h0/node.key").read_bytes(), password=None)
    public = serialization.load_ssh_public_key((tmp_path / "nodes/h0/node.pub").read_bytes())
    assert isinstance(private, ec.EllipticCurvePrivateKey)
    assert private.public_key() == public
    for secret in ("ca.key", "superlink.key", "nodes/h0/node.key"):
        assert stat.S_IMODE(os.stat(tmp_path / secret).st_mode) == 0o600, secret


def test_init_again_adds_hospitals_and_keeps_every_existing_key(tmp_path: Path) -> None:
    init(tmp_path, ["h0"], [], days=30)
    before = {p: p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()}
    added = init(tmp_path, ["h0", "h1"], [], days=30)
    assert added == [tmp_path / "nodes/h1/node.key", tmp_path / "nodes/h1/node.pub"]
    assert all(p.read_bytes() == content for p, content in before.items())


def test_connect_adds_a_superlink_and_keeps_the_others(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FLWR_HOME", str(tmp_path / "flwr"))
    init(tmp_path / "certs", ["h0"], [], days=30)
    connect("first", "10.0.0.1:9092", tmp_path / "certs/ca.crt")
    path = connect("second", "127.0.0.1:9092", tmp_path / "certs/ca.crt")
    config = tomllib.loads(path.read_text())["superlink"]
    assert config["default"] == "first"
    assert config["second"] == {"address": "127.0.0.1:9092", "root-certificates": str(tmp_path / "certs/ca.crt")}
    assert config["first"]["address"] == "10.0.0.1:9092"


def test_the_superlink_runs_with_tls_node_auth_persistent_state_and_no_runtime_install(tmp_path: Path) -> None:
    init(tmp_path, ["h0"], [], days=30)
    command = superlink_command(tmp_path, tmp_path / "state", "127.0.0.1", 9092)
    for flag in ("--ssl-certfile", "--ssl-keyfile", "--ssl-ca-certfile", "--enable-supernode-auth",
                 "--disable-runtime-dependency-installation"):
        assert flag in command
    assert command[command.index("--database") + 1] == str(tmp_path / "state" / "superlink.db")
    assert "--insecure" not in command


def test_setup_refuses_bad_input_with_one_line_before_writing_anything(tmp_path: Path,
                                                                       capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SetupError, match=r"^--hospitals: 'a b' is not a hospital id"):
        init(tmp_path / "certs", ["a b"], [], days=30)
    with pytest.raises(SetupError, match=r"^--hospitals: a hospital id is listed twice"):
        init(tmp_path / "certs", ["h0", "h0"], [], days=30)
    with pytest.raises(ConfigError, match=r"^federation\.min_participants"):
        write_partitions(tmp_path / "data", ["h0", "h1"], [])  # two hospitals, but runs need three by default
    assert not (tmp_path / "certs").exists() and not (tmp_path / "data").exists()
    init(tmp_path / "certs", ["h0"], [], days=30)
    with pytest.raises(SetupError, match=r"^--data-dir: no such folder"):
        write_node_config(tmp_path / "certs", "h0", tmp_path / "state", tmp_path / "missing", None,
                          tmp_path / "approved.txt")
    (tmp_path / "data").mkdir()
    with pytest.raises(SetupError, match=r"^--approved-bundles: no such file"):
        write_node_config(tmp_path / "certs", "h0", tmp_path / "state", tmp_path / "data", None,
                          tmp_path / "approved.txt")
    with pytest.raises(SystemExit) as exit_info:
        main(["superlink", str(tmp_path / "nowhere")])
    assert exit_info.value.code == 2
    assert capsys.readouterr().err.strip() == f"federation: certs: no such file {tmp_path / 'nowhere' / 'ca.crt'}"


def test_the_app_bundle_sent_to_every_node_carries_the_whole_config_tree(tmp_path: Path) -> None:
    """`flwr run` ships the app as a bundle built by the .gitignore rules: the federation's own folder (keys,
    data) is ignored, and an ignore rule must not swallow a `conf/` group of the same name."""
    repo = Path(__file__).resolve().parents[1]
    flwr = Path(sys.executable).with_name("flwr")
    built = subprocess.run([str(flwr), "build", "--app", str(repo)], cwd=tmp_path, capture_output=True, text=True)
    assert built.returncode == 0, built.stdout + built.stderr
    (bundle,) = tmp_path.glob("*.fab")
    names = zipfile.ZipFile(bundle).namelist()
    conf = sorted(p.relative_to(repo).as_posix() for p in (repo / "conf").rglob("*.yaml"))
    assert sorted(n for n in names if n.startswith("conf/")) == conf
    assert not [n for n in names if n.startswith(("federation/", ".venv/", "outputs/"))]
    # only what the apps run: no tests, docs, chart, images or scripts in what every hospital reviews
    assert {n.split("/")[0] for n in names} == {"fl_core", "fl_server", "fl_client", "strategies", "privacy",
                                                "gateway", "conf", "pyproject.toml", ".info"}
    # What a hospital approves from the app's folder is the digest of the bundle `flwr build` and `flwr run` make.
    listed = tmp_path / "approved-bundles.txt"
    digest = approve(repo, listed, note="release under review")
    assert digest == bundle_digest(bundle.read_bytes()) and digest.removeprefix("sha256:")[:8] in bundle.name
    assert approve(bundle, listed) == digest  # the .fab file itself gives the same digest, listed once
    assert load_approved(listed) == {digest} and len(listed.read_text().splitlines()) == 1
