"""The pre-deployment gate's security half (`make check` also lints, type-checks, and renders and validates the chart,
the compose file and the Dockerfile through tests/test_packaging.py): bandit over the code, failing on any
high-severity finding, and pip-audit over the installed dependencies, failing on any known vulnerability. Where
the vulnerability service does not answer (an offline mirror, as here), the audit says how many packages it could
not check instead of passing in silence; with --strict (a release pipeline where pypi.org answers) that fails too.

    .venv/bin/python scripts/check_deploy.py [--strict]
"""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Mapping
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("fl_core", "fl_server", "fl_client", "strategies", "privacy", "gateway", "scripts")
BIN = Path(sys.executable).parent
AUDIT_SECONDS = 300


def bandit_findings(paths: list[Path]) -> list[str]:
    """High-severity findings, one line each (file:line test: message)."""
    out = subprocess.run([str(BIN / "bandit"), "-q", "-r", "-f", "json", *map(str, paths)],
                         capture_output=True, text=True, cwd=ROOT)
    report = json.loads(out.stdout)
    if report.get("errors"):
        raise RuntimeError(f"bandit could not read {report['errors'][0]['filename']}: {report['errors'][0]['reason']}")
    return [f"{r['filename']}:{r['line_number']} {r['test_id']}: {r['issue_text']}"
            for r in report["results"] if r["issue_severity"] == "HIGH"]


def audit_findings(report: Mapping[str, object]) -> tuple[list[str], int, int]:
    """(known vulnerabilities, one line each; packages not checked; packages checked) from pip-audit's JSON."""
    dependencies = report["dependencies"]
    assert isinstance(dependencies, list)
    vulnerable = [f"{d['name']} {d['version']}: {v['id']} (fixed in {', '.join(v.get('fix_versions') or ['none yet'])})"
                  for d in dependencies for v in d.get("vulns", [])]
    skipped = sum(1 for d in dependencies if "skip_reason" in d)
    return vulnerable, skipped, len(dependencies) - skipped


def run_audit() -> dict[str, object] | None:
    """pip-audit's report on this environment, or None when it could not run to the end in time."""
    try:
        out = subprocess.run([str(BIN / "pip-audit"), "-l", "--progress-spinner", "off", "-f", "json",
                              "--timeout", "10"], capture_output=True, text=True, timeout=AUDIT_SECONDS)
    except subprocess.TimeoutExpired:
        return None
    try:
        report = json.loads(out.stdout)
    except ValueError:
        return None
    return report if isinstance(report, dict) else None


def main() -> None:
    strict = "--strict" in sys.argv[1:]
    problems = bandit_findings([ROOT / p for p in PACKAGES])
    print(f"bandit: {len(problems)} high-severity findings in {', '.join(PACKAGES)}")
    report = run_audit()
    if report is None:
        print(f"dependencies: NOT CHECKED: pip-audit failed or did not finish within {AUDIT_SECONDS} s")
        problems += ["dependencies not checked (--strict)"] if strict else []
    else:
        vulnerable, skipped, checked = audit_findings(report)
        problems += vulnerable + ([f"{skipped} dependencies not checked (--strict)"] if strict and skipped else [])
        print(f"dependencies: {checked} checked, {len(vulnerable)} known vulnerabilities"
              + (f"; NOT CHECKED: {skipped} packages the vulnerability service did not answer for "
                 "(run where pypi.org answers, with --strict)" if skipped else ""))
    for problem in problems:
        print(f"FAIL: {problem}")
    raise SystemExit(1 if problems else 0)


if __name__ == "__main__":
    main()
