"""fl-compliance: each HIPAA §164.312 and GDPR control read from the deployment's own configuration, with evidence;
a required control missing fails the check; bad input is one line."""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Mapping
from pathlib import Path

import pytest
import yaml

from gateway.compliance_cli import main

REPO = Path(__file__).resolve().parents[1]
CHART = REPO / "helm" / "federated-dp-llm"
HOSPITALS = [{"hospital": f"hospital-{h}", "keySecret": f"hospital-{h}-node"} for h in "abc"]


def statuses(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, dict[str, dict[str, object]]]:
    with pytest.raises(SystemExit) as done:
        main(["--chart", str(CHART), "--json", *args])
    rows = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    return int(done.value.code or 0), {str(r["ref"]): r for r in rows}


def values_file(tmp_path: Path, values: Mapping[str, object]) -> str:
    path = tmp_path / "values.yaml"
    path.write_text(yaml.safe_dump(values))
    return str(path)


def test_the_reference_deployment_meets_every_required_control_once_backups_are_on(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, found = statuses(capsys, "--values", values_file(tmp_path, {"supernodes": HOSPITALS}))
    missing = {ref for ref, c in found.items() if c["required"] and c["status"] == "not met"}
    assert code == 1 and missing == {"Art. 32(1)(c)"}  # the chart's default: no backups
    backups = {"supernodes": HOSPITALS, "backup": {"enabled": True, "claim": "backups"}}
    code, found = statuses(capsys, "--values", values_file(tmp_path, backups))
    assert code == 0 and all(c["status"] in ("met", "n/a") for c in found.values() if c["required"])
    assert "2555 days" in str(found["§164.312(b)"]["evidence"]) and "30 minutes" in str(
        found["§164.312(a)(2)(iii)"]["evidence"])
    assert found["§164.312(e)(2)(ii)"]["status"] == "not met" and not found["§164.312(e)(2)(ii)"]["required"]
    assert found["Art. 17"]["status"] == "n/a" and "epsilon" in str(found["Art. 17"]["evidence"])


def test_each_weakened_setting_fails_the_control_it_belongs_to(tmp_path: Path,
                                                               capsys: pytest.CaptureFixture[str]) -> None:
    values = values_file(tmp_path, {"supernodes": [*HOSPITALS, {"hospital": "no-key"}],
                                    "superlink": {"tlsSecret": ""}, "backup": {"enabled": True, "claim": "b"}})
    code, found = statuses(capsys, "--values", values, "--gateway", "+preset=production",
                           "--gateway", "auth.token_minutes=600", "--gateway", "audit.retention_days=30",
                           "--gateway", "audit.head_path=/var/lib/gateway/head.json",
                           "--training", "+preset=production", "--training", "privacy.enabled=false")
    missing = {ref for ref, c in found.items() if c["status"] == "not met" and c["required"]}
    assert code == 1 and missing == {"§164.312(a)(2)(iii)", "§164.312(b)", "§164.312(d)", "§164.312(e)(1)",
                                     "Art. 25"}
    assert "NOT apart" in str(found["§164.312(b)"]["evidence"])
    assert "WITHOUT differential privacy" in str(found["Art. 25"]["evidence"])


def test_the_console_command_reports_a_line_per_control_and_bad_input_in_one_line(tmp_path: Path) -> None:
    command = [str(Path(sys.executable).parent / "fl-compliance"), "--chart", str(CHART)]
    out = subprocess.run(command, capture_output=True, text=True, timeout=60)
    lines = out.stdout.splitlines()
    assert out.returncode == 1 and lines[-1] == "16 controls: 12 met, 1 required not met"
    assert any(line.startswith("NOT MET  GDPR  Art. 32(1)(c)") for line in lines)
    for args, named in ((["--values", str(tmp_path / "none.yaml")], "--values: no such file"),
                        (["--gateway", "port=0"], "--gateway: port"),
                        (["--training", "privacy.delta=2"], "--training: privacy.delta")):
        bad = subprocess.run([*command, *args], capture_output=True, text=True, timeout=60)
        assert bad.returncode == 2 and bad.stdout == "" and named in bad.stderr
        assert len(bad.stderr.strip().splitlines()) == 1
