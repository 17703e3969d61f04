"""Container and Kubernetes packaging, checked without a Docker engine or a cluster.

The Dockerfile is linted with hadolint, the compose file parsed against the Compose specification, and the Helm
chart rendered by Helm's own library and validated against the Kubernetes schemas.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import tomllib
import zipfile
from pathlib import Path
from typing import Any

import helm_python
import kubernetes_validate
import pytest
import yaml
from compose_spec import PyOptions
from helm_python.chart import Chart

from gateway.config import compose_gateway_config

REPO = Path(__file__).resolve().parents[1]
DOCKERFILE = REPO / "docker" / "Dockerfile"
CHART = REPO / "helm" / "federated-dp-llm"
TARGETS = ("superlink", "serverapp", "supernode", "mlflow", "gateway", "replica")
APPROVED = "sha256:" + "ab" * 32
HOSPITALS = [{"hospital": f"hospital-{h}", "keySecret": f"hospital-{h}-node", "dataClaim": f"hospital-{h}-data",
              "approvedBundles": [APPROVED]} for h in "abc"]
SECRETISH = re.compile(r"secret|password|token|key", re.IGNORECASE)


def dockerfile_stages() -> dict[str, list[str]]:
    """Instructions of each named stage, with those of the stage it builds on; continuation lines joined."""
    stages: dict[str, list[str]] = {}
    current: list[str] = []
    for line in re.sub(r"\\\n\s*", " ", DOCKERFILE.read_text()).splitlines():
        if match := re.match(r"FROM (\S+) AS (\S+)", line):
            current = stages.setdefault(match.group(2), list(stages.get(match.group(1), [])))
        elif line.strip() and not line.startswith("#"):
            current.append(line.strip())
    return stages


def test_dockerfile_passes_hadolint() -> None:
    hadolint = Path(sys.executable).with_name("hadolint")
    result = subprocess.run([str(hadolint), "--no-color", str(DOCKERFILE)], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr


def test_every_image_runs_unprivileged_with_a_health_check() -> None:
    stages = dockerfile_stages()
    for target in TARGETS:
        instructions = stages[target]
        assert "USER 10001:10001" in instructions, target
        assert any(i.startswith("HEALTHCHECK ") for i in instructions), target
        assert any(i.startswith("COPY --from=") for i in instructions), target  # built in another stage


def test_image_versions_are_the_projects_pins() -> None:
    pins = dict(re.findall(r"^ *\"([a-z-]+)(?:\[[a-z]+\])?==([0-9.]+)\"", (REPO / "pyproject.toml").read_text(),
                           re.MULTILINE))
    args = dict(re.findall(r"^ARG ([A-Z_]+)=(\S*)$", DOCKERFILE.read_text(), re.MULTILINE))
    assert args["FLWR_VERSION"] == pins["flwr"]
    assert args["TORCH_VERSION"] == pins["torch"]


def compose() -> dict[str, Any]:
    text = (REPO / "docker" / "compose.yaml").read_text()
    parsed = PyOptions(apply_merge=True).from_yaml(text)  # checks every key and type against the spec
    parsed.validate()
    return dict(parsed.to_dict())


def test_compose_file_is_a_valid_three_hospital_federation() -> None:
    spec = compose()
    services = spec["services"]
    targets = {name: s["build"]["target"] for name, s in services.items() if "build" in s}
    assert set(targets.values()) == set(TARGETS)
    assert {name for name in services if name not in targets} == {"redis", "jaeger"}  # the upstream images
    hospitals = [name for name, target in targets.items() if target == "supernode"]
    assert len(hospitals) == 3
    for name, service in services.items():
        assert set(service.get("depends_on", [])) <= set(services), name
        for secret in service.get("secrets", []):
            assert (secret if isinstance(secret, str) else secret["source"]) in spec["secrets"], name
        for config in service.get("configs", []):
            assert config["source"] in spec["configs"], name
        for volume in service.get("volumes", []):
            source = volume.split(":")[0]
            assert source.startswith("..") or source in spec["volumes"], (name, volume)
        for variable, value in service.get("environment", {}).items():  # secrets only as files, never values
            assert not SECRETISH.search(variable) or str(value).startswith("/run/secrets/"), (name, variable)
    for hospital in hospitals:
        node_config = tomllib.loads(spec["configs"][hospital]["content"])
        assert node_config == {"hospital-id": hospital, "state-dir": "/var/lib/node", "data-dir": "/data",
                               "approved-bundles": "/etc/fl/approved-bundles.txt"}
    assert spec["secrets"]["superexec_secret"] == {"environment": "FL_SUPEREXEC_SECRET"}  # never in the file


def test_compose_confines_every_container_and_keeps_each_to_its_peers() -> None:
    spec = compose()
    services = spec["services"]
    for name, service in services.items():
        assert service["read_only"] is True and service["cap_drop"] == ["ALL"], name
        assert "no-new-privileges:true" in service["security_opt"], name
        assert service["deploy"]["resources"]["limits"]["memory"], name
        assert service.get("user", "10001") != "0" and "privileged" not in service, name

    def peers(name: str) -> set[str]:
        return {other for other, s in services.items() if other != name and set(s["networks"]) & set(
            services[name]["networks"])}

    hospitals = {name for name, s in services.items() if s.get("build", {}).get("target") == "supernode"}
    for hospital in hospitals:  # a node reaches the SuperLink (and the runner and other nodes there), nothing else
        assert peers(hospital) == {"superlink", "serverapp"} | (hospitals - {hospital})
    assert peers("redis") == {"gateway", "replica-1", "replica-2"} and "ports" not in services["redis"]
    assert spec["networks"]["serving"]["internal"] is True
    assert [s for s in services if set(services[s]["networks"]) == {"serving"}] == ["redis"]
    assert "redis_password" in services["redis"]["secrets"] and "redis_password" in services["gateway"]["secrets"]
    assert "--appendfsync always" in services["redis"]["command"][-1]
    assert services["gateway"]["environment"]["FL_GATEWAY_REDIS_PASSWORD_FILE"] == "/run/secrets/redis_password"
    # Spans go to Jaeger, which only the gateway and the replicas reach, and only when the operator turns tracing on.
    assert peers("jaeger") == {"gateway", "replica-1", "replica-2"} and spec["networks"]["tracing"]["internal"]
    for name in ("gateway", "replica-1", "replica-2"):
        environment = services[name]["environment"]
        assert environment["OTEL_EXPORTER_OTLP_ENDPOINT"] == "http://jaeger:4318", name
        assert environment["OTEL_TRACES_EXPORTER"] == "${OTEL_TRACES_EXPORTER:-none}", name
    # The gateway's audit log and its sealed head, as its preset and command place them, on two volumes.
    gateway = compose_gateway_config(["+preset=production", *services["gateway"]["command"]], check_files=False)
    volumes = dict(reversed(v.split(":")) for v in services["gateway"]["volumes"])
    log_volume, head_volume = (volumes[str(Path(p).parent)] for p in (gateway.audit.path, gateway.audit.head_path))
    assert log_volume != head_volume and {log_volume, head_volume} <= set(spec["volumes"])


def render(values: dict[str, Any], release: str = "fed") -> list[dict[str, Any]]:
    chart = Chart.load(str(CHART))
    rendered = chart.render(values, name=release, namespace="hospitals")
    return [doc for path, text in rendered.items() if not path.endswith("NOTES.txt")  # as `helm template` does
            for doc in yaml.safe_load_all(text) if doc]


def test_chart_renders_manifests_that_kubernetes_accepts() -> None:
    manifests = render({"supernodes": HOSPITALS})
    version = kubernetes_validate.latest_version()
    for manifest in manifests:
        kubernetes_validate.validate(manifest, version, strict=True)
    kinds = sorted((m["kind"], m["metadata"]["name"]) for m in manifests)
    assert ("StatefulSet", "fed-federated-dp-llm-superlink") in kinds
    assert ("Service", "fed-federated-dp-llm-superlink") in kinds
    assert [name for kind, name in kinds if kind == "StatefulSet" and "hospital" in name] == [
        f"fed-federated-dp-llm-hospital-{h}" for h in "abc"]
    assert "Secret" not in {kind for kind, _ in kinds}  # secrets come only from Secrets the operator created


def pod_specs(manifests: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [m["spec"]["template"]["spec"] for m in manifests if m["kind"] in ("Deployment", "StatefulSet")]


def test_every_pod_runs_unprivileged_and_reads_secrets_only_from_secrets() -> None:
    for pod in pod_specs(render({"supernodes": HOSPITALS})):
        assert pod["securityContext"]["runAsNonRoot"] is True and pod["securityContext"]["runAsUser"] != 0
        for container in pod["containers"]:
            sc = container["securityContext"]
            assert sc["allowPrivilegeEscalation"] is False and sc["readOnlyRootFilesystem"] is True
            assert "livenessProbe" in container and "readinessProbe" in container
            for env in container.get("env", []):
                assert not (SECRETISH.search(env["name"]) and "value" in env), env
        assert all("hostPath" not in v for v in pod["volumes"])


def test_a_hospitals_policy_and_gpu_reach_its_node_only() -> None:
    nodes = [dict(HOSPITALS[0], policy={"max_epsilon_per_run": 4, "min_noise_multiplier": 0.8}, gpu=1,
                  logFormat="json"), HOSPITALS[1]]
    manifests = render({"supernodes": nodes})
    configs = {m["metadata"]["name"]: m["data"] for m in manifests if m["kind"] == "ConfigMap"}
    a, b = configs["fed-federated-dp-llm-hospital-a"], configs["fed-federated-dp-llm-hospital-b"]
    assert yaml.safe_load(a["policy.yaml"]) == {"max_epsilon_per_run": 4, "min_noise_multiplier": 0.8}
    assert tomllib.loads(a["node.toml"])["policy-file"] == "/etc/fl/policy.yaml"
    assert "policy.yaml" not in b and "policy-file" not in tomllib.loads(b["node.toml"])
    assert [tomllib.loads(c["node.toml"])["log-format"] for c in (a, b)] == ["json", "text"]
    limits = {m["metadata"]["name"]: m["spec"]["template"]["spec"]["containers"][0]["resources"]["limits"]
              for m in manifests if m["kind"] == "StatefulSet"}
    assert limits["fed-federated-dp-llm-hospital-a"]["nvidia.com/gpu"] == 1
    assert "nvidia.com/gpu" not in limits["fed-federated-dp-llm-hospital-b"]


def test_a_node_without_its_key_secret_fails_to_render_naming_the_value() -> None:
    with pytest.raises(Exception, match=r"supernodes\[hospital-a\]\.keySecret"):
        render({"supernodes": [{"hospital": "hospital-a", "dataClaim": "a", "approvedBundles": [APPROVED]}]})


def test_every_node_runs_fl_node_with_its_state_and_the_bundles_its_hospital_approved() -> None:
    defaults = {"supernodeDefaults": {"approvedBundles": [APPROVED]}}
    nodes = [{k: v for k, v in h.items() if k != "approvedBundles"} for h in HOSPITALS]
    nodes[1]["approvedBundles"] = ["sha256:" + "cd" * 32]  # hospital-b approved another release
    manifests = render({"supernodes": nodes, **defaults})
    configs = {m["metadata"]["name"]: m["data"] for m in manifests if m["kind"] == "ConfigMap"}
    for h, digest in (("a", APPROVED), ("b", "sha256:" + "cd" * 32)):
        data = configs[f"fed-federated-dp-llm-hospital-{h}"]
        node = tomllib.loads(data["node.toml"])
        assert node["approved-bundles"] == "/etc/fl/approved-bundles.txt" and node["state-dir"] == "/var/lib/node"
        assert data["approved-bundles.txt"].split() == [digest]
    for pod in pod_specs([m for m in manifests if m["kind"] == "StatefulSet" and "hospital" in m["metadata"]["name"]]):
        command = pod["containers"][0]["command"]
        assert command[:3] == ["fl-node", "run", "/etc/fl/node.toml"]
        assert any(m["mountPath"] == "/var/lib/node" for m in pod["containers"][0]["volumeMounts"])  # persistent
    with pytest.raises(Exception, match=r"supernodes\[hospital-a\]\.approvedBundles"):
        render({"supernodes": nodes[:1]})
    compose_nodes = {n: s for n, s in compose()["services"].items() if n.startswith("hospital-")}
    for service in compose_nodes.values():
        assert {c["target"] for c in service["configs"]} == {"/etc/fl/node.toml", "/etc/fl/approved-bundles.txt"}


def test_runs_are_tracked_on_the_mlflow_service_which_answers_its_own_name() -> None:
    manifests = render({"supernodes": HOSPITALS})
    deployments = {m["metadata"]["name"]: m["spec"]["template"]["spec"]["containers"][0]
                   for m in manifests if m["kind"] == "Deployment"}
    env = {e["name"]: e["value"] for e in deployments["fed-federated-dp-llm-serverapp"]["env"]}
    assert env["MLFLOW_TRACKING_URI"] == "http://fed-federated-dp-llm-mlflow:5000"
    allowed = [a for a in deployments["fed-federated-dp-llm-mlflow"]["command"] if a.startswith("--allowed-hosts=")]
    assert "fed-federated-dp-llm-mlflow:5000" in allowed[0].split("=", 1)[1].split(",")
    services = compose()["services"]
    assert services["serverapp"]["environment"]["MLFLOW_TRACKING_URI"] == "http://mlflow:5000"
    assert "mlflow:5000" in services["mlflow"]["command"][1].split(",")


def test_a_hospital_id_that_is_no_dns_name_still_gives_valid_resource_names() -> None:
    manifests = render({"supernodes": [{"hospital": "St_Marys.Oncology", "keySecret": "k", "dataClaim": "d",
                                        "approvedBundles": [APPROVED]}]})
    version = kubernetes_validate.latest_version()
    for manifest in manifests:
        kubernetes_validate.validate(manifest, version, strict=True)
    config = next(m for m in manifests if m["kind"] == "ConfigMap")
    assert config["metadata"]["name"] == "fed-federated-dp-llm-st-marys-oncology"
    assert tomllib.loads(config["data"]["node.toml"])["hospital-id"] == "St_Marys.Oncology"


SERVING = {"serving": {"enabled": True, "replica": {"modelSource": "models:/federated-dp-llm/3", "count": 3},
                       "gateway": {"clientCertificates": True, "corsOrigins": ["https://ehr.example.org"]}}}


def test_serving_renders_a_scaled_probed_scraped_gateway_over_each_replica(tmp_path: Path, monkeypatch) -> None:
    manifests = render(SERVING)
    version = kubernetes_validate.latest_version()
    for manifest in manifests:
        kubernetes_validate.validate(manifest, version, strict=True)
    by_kind = {(m["kind"], m["metadata"]["name"]): m for m in manifests}
    gateway = by_kind[("StatefulSet", "fed-federated-dp-llm-gateway")]  # each pod keeps its name, log and head
    hpa = by_kind[("HorizontalPodAutoscaler", "fed-federated-dp-llm-gateway")]
    assert hpa["spec"]["scaleTargetRef"] == {"apiVersion": "apps/v1", "kind": "StatefulSet",
                                             "name": "fed-federated-dp-llm-gateway"}
    assert "replicas" not in gateway["spec"]  # the autoscaler owns the count
    pod = gateway["spec"]["template"]
    container = pod["spec"]["containers"][0]
    operations = next(p["containerPort"] for p in container["ports"] if p["name"] == "operations")
    assert pod["metadata"]["annotations"] == {"prometheus.io/scrape": "true", "prometheus.io/port": str(operations),
                                              "prometheus.io/path": "/metrics"}
    assert container["livenessProbe"]["httpGet"] == {"path": "/health", "port": "operations"}
    assert container["readinessProbe"]["httpGet"] == {"path": "/ready", "port": "operations"}
    replicas = by_kind[("StatefulSet", "fed-federated-dp-llm-replica")]
    assert replicas["spec"]["replicas"] == 3
    assert "replica.source=models:/federated-dp-llm/3" in replicas["spec"]["template"]["spec"]["containers"][0][
        "command"]
    policy = by_kind[("NetworkPolicy", "fed-federated-dp-llm-replica")]
    assert policy["spec"]["ingress"][0]["from"][0]["podSelector"]["matchLabels"][
        "app.kubernetes.io/component"] == "gateway"

    # The gateway's arguments are a valid gateway config (files stand in for the mounted Secrets)
    args = container["command"][container["command"].index("serve") + 1:]
    for name in ("tls.crt", "tls.key", "ca.crt"):
        (tmp_path / name).write_text("")
    args = [a.replace("/run/secrets/tls", str(tmp_path)).replace("$(POD_NAME)", "pod-0") for a in args]
    cfg = compose_gateway_config(args)
    assert cfg.routing.backends == [f"http://fed-federated-dp-llm-replica-{i}.fed-federated-dp-llm-replica:9000"
                                    for i in range(3)]
    assert (cfg.port, cfg.metrics_port, cfg.limits.store, cfg.cors_origins) == (
        8443, operations, "redis", ["https://ehr.example.org"])
    assert cfg.tls.client_ca is not None and cfg.privacy.epsilon_per_query == 0.05
    # the audit log and its sealed head on two volumes; the chain and the text under two keys
    mounts = {m["mountPath"]: m["name"] for m in container["volumeMounts"]}
    claims = {c["metadata"]["name"] for c in gateway["spec"]["volumeClaimTemplates"]}  # per pod, kept across restarts
    log_volume, head_volume = (mounts[str(Path(p).parent)] for p in (cfg.audit.path, cfg.audit.head_path))
    assert log_volume != head_volume and {log_volume, head_volume} <= claims
    keys = {e["name"]: e["valueFrom"]["secretKeyRef"]["key"] for e in container["env"] if "valueFrom" in e
            and "secretKeyRef" in e["valueFrom"]}
    assert keys[cfg.audit.chain_key_env] != keys[cfg.audit.text_key_env]


def test_every_component_admits_only_the_traffic_its_role_needs() -> None:
    manifests = render({**SERVING, "supernodes": HOSPITALS})
    version = kubernetes_validate.latest_version()
    policies = {m["spec"]["podSelector"]["matchLabels"]["app.kubernetes.io/component"]: m["spec"]
                for m in manifests if m["kind"] == "NetworkPolicy"}
    for policy in policies.values():
        kubernetes_validate.validate({"apiVersion": "networking.k8s.io/v1", "kind": "NetworkPolicy",
                                      "metadata": {"name": "p"}, "spec": policy}, version, strict=True)
    components = {m["spec"]["template"]["metadata"]["labels"]["app.kubernetes.io/component"]
                  for m in manifests if m["kind"] in ("Deployment", "StatefulSet")}
    assert components == set(policies) and all(p["policyTypes"] == ["Ingress"] for p in policies.values())

    def sources(component: str) -> list[set[str]]:
        return [{peer["podSelector"]["matchLabels"]["app.kubernetes.io/component"] for peer in rule.get("from", [])
                 if "podSelector" in peer} for rule in policies[component]["ingress"]]

    assert policies["supernode"]["ingress"] == []  # the runner: only its metrics port (test below)
    assert sources("redis") == [{"gateway"}] and sources("replica") == [{"gateway"}]
    assert sources("mlflow") == [{"serverapp", "replica"}]
    assert [rule["ports"] for rule in policies["superlink"]["ingress"]] == [[{"port": 9092}]]
    hospitals_only = [{"ipBlock": {"cidr": "10.20.0.0/16"}}]  # narrowed to the hospitals: the runner still reaches it
    narrowed = next(m["spec"] for m in render({"supernodes": HOSPITALS, "superlink": {"allowFrom": hospitals_only}})
                    if m["kind"] == "NetworkPolicy" and m["metadata"]["name"].endswith("-superlink"))
    peers = narrowed["ingress"][0]["from"]
    assert hospitals_only[0] in peers and {p["podSelector"]["matchLabels"]["app.kubernetes.io/component"]
                                           for p in peers if "podSelector" in p} == {"serverapp", "supernode"}
    operations = next(r for r in policies["gateway"]["ingress"] if r["ports"] == [{"port": 8080}])
    assert operations["from"] == [{"namespaceSelector": {}}]  # in the cluster only: metrics are unauthenticated


def test_redis_requires_a_password_from_a_secret_and_speaks_tls_when_asked(tmp_path: Path) -> None:
    from fl_core.backup_cli import _parser

    for tls in (False, True):
        values = {"serving": {**SERVING["serving"], "redis": {"tls": {"enabled": tls}}},
                  "backup": {"enabled": True, "claim": "backups"}}
        manifests = render(values)
        version = kubernetes_validate.latest_version()
        for manifest in manifests:
            kubernetes_validate.validate(manifest, version, strict=True)
        pods = {m["metadata"]["name"]: m["spec"]["template"]["spec"] for m in manifests
                if m["kind"] in ("Deployment", "StatefulSet")}
        redis_container = pods["fed-federated-dp-llm-redis"]["containers"][0]
        gateway_container = pods["fed-federated-dp-llm-gateway"]["containers"][0]
        secret = {"name": "gateway-redis", "key": "password"}
        assert {"name": "REDISCLI_AUTH", "valueFrom": {"secretKeyRef": secret}} in redis_container["env"]
        assert {"name": "FL_GATEWAY_REDIS_PASSWORD", "valueFrom": {"secretKeyRef": secret}} in gateway_container["env"]
        script = redis_container["command"][-1]
        assert "requirepass" in script and ("--tls-port 6379" in script) == tls and ("--port 0" in script) == tls
        assert "--appendfsync always" in script  # a charge acknowledged is a charge kept, crash included
        assert "--sanitize-dump-payload yes" in script  # a restored copy's payloads are checked whole
        args = gateway_container["command"][gateway_container["command"].index("serve") + 1:]
        # Its backup job reaches it as the gateway does: the same URL and, with TLS, the same CA from the same Secret.
        (job,) = [m["spec"]["jobTemplate"]["spec"]["template"]["spec"] for m in manifests
                  if m["metadata"]["name"] == "fed-federated-dp-llm-backup-redis"]
        backup = _parser().parse_args(job["containers"][0]["command"][1:])
        assert f"limits.redis_url={backup.items[0].source}" in args
        assert (f"limits.redis_ca={backup.redis_ca}" in args) == tls and (backup.redis_ca is not None) == tls
        gateway_ca = [v for v in pods["fed-federated-dp-llm-gateway"]["volumes"] if v["name"] == "redis-ca"]
        assert [v for v in job["volumes"] if v["name"] == "redis-ca"] == gateway_ca
        assert [m["mountPath"] for m in job["containers"][0]["volumeMounts"] if m["name"] == "redis-ca"] == (
            [str(backup.redis_ca.parent)] if tls else [])
        for name in ("tls.crt", "tls.key", "ca.crt"):
            (tmp_path / name).write_text("")
        args = [a.replace("/run/secrets/tls", str(tmp_path)).replace("/run/secrets/redis-tls", str(tmp_path))
                .replace("$(POD_NAME)", "pod-0") for a in args]
        cfg = compose_gateway_config(args)
        assert cfg.limits.redis_url is not None and cfg.limits.redis_url.startswith("rediss://" if tls else "redis://")
        assert (cfg.limits.redis_ca is not None) == tls and cfg.limits.redis_password_env == "FL_GATEWAY_REDIS_PASSWORD"


def test_serving_without_a_model_source_fails_to_render_naming_the_value() -> None:
    with pytest.raises(Exception, match=r"serving\.replica\.modelSource is required"):
        render({"serving": {"enabled": True}})


@pytest.mark.parametrize(("values", "named"), [
    ({"superlink": {"port": "ninety"}}, "/superlink/port"),
    ({"servng": {"enabled": True}}, "servng"),  # a typo of serving: refused, not ignored
    ({"serving": {"gateway": {"operationsPort": 70000}}}, "/serving/gateway/operationsPort"),
    ({"serving": {"replica": {"device": "gpu"}}}, "/serving/replica/device"),
    ({"supernodes": [{**HOSPITALS[0], "approvedBundles": ["sha256:abc"]}]}, "/supernodes/0/approvedBundles/0"),
    ({"supernodes": [{**HOSPITALS[0], "gpus": 1}]}, "gpus"),
    ({"serving": {"gateway": {"slot": "purple"}}}, "/serving/gateway/slot"),
    ({"serving": {"gateway": {"service": {"liveSlot": "red"}}}}, "/serving/gateway/service/liveSlot"),
    ({"serving": {"redis": {"address": "redis://blue-federated-dp-llm-redis"}}}, "/serving/redis/address"),
])
def test_values_of_the_wrong_type_or_unknown_keys_are_refused_naming_them(values: dict[str, Any], named: str) -> None:
    with pytest.raises(Exception, match="values don't meet the specifications") as refused:
        render(values)
    assert named in str(refused.value)


def test_helm_lint_finds_no_error_and_checks_values_against_the_schema() -> None:
    assert helm_python.lint(str(CHART), {"supernodes": HOSPITALS}, strict=True)["errors"] == []
    noted = [{**HOSPITALS[0], "approvedBundles": [f"{APPROVED}  # release 0.1.0, reviewed by the DPO"]}]
    assert helm_python.lint(str(CHART), {"supernodes": noted}, strict=True)["errors"] == []  # as fl-node reads
    linted = helm_python.lint(str(CHART), {"superlink": {"port": "ninety"}})
    assert any("/superlink/port" in error for error in linted["errors"])


def test_the_chart_tells_the_operator_what_was_installed_and_what_to_do_next() -> None:
    chart = Chart.load(str(CHART))
    notes = chart.render({"supernodes": HOSPITALS, "serving": {"enabled": True, "replica": {
        "modelSource": "models:/federated-dp-llm/3"}}}, name="fed", namespace="hospitals")
    text = next(v for k, v in notes.items() if k.endswith("NOTES.txt"))
    assert "fed-federated-dp-llm-superlink.hospitals" in text and "hospital-a" in text
    assert "models:/federated-dp-llm/3" in text and "fl-audit verify" in text
    assert (CHART / "README.md").read_text().count("| `") >= 20  # every value group documented in a table


def test_the_wheel_carries_conf_and_an_installed_package_composes_its_config(tmp_path: Path) -> None:
    source = tmp_path / "source"  # setuptools builds in the tree's build/: build a copy, never the checkout
    shutil.copytree(REPO, source, ignore=shutil.ignore_patterns(".git", ".venv", "build", "outputs", "*.egg-info",
                                                                  "__pycache__", ".*_cache"))
    built = subprocess.run([sys.executable, "-m", "pip", "wheel", str(source), "--no-deps", "--no-build-isolation",
                            "-q", "-w", str(tmp_path / "dist")], capture_output=True, text=True, timeout=300)
    assert built.returncode == 0, built.stderr[-2000:]
    (wheel,) = (tmp_path / "dist").glob("*.whl")
    site = tmp_path / "site"
    zipfile.ZipFile(wheel).extractall(site)
    assert sorted(p.relative_to(site / "fl_core" / "conf") for p in (site / "fl_core" / "conf").rglob("*.yaml")) == \
        sorted(p.relative_to(REPO / "conf") for p in (REPO / "conf").rglob("*.yaml"))
    script = ("from fl_core.config import CONF_DIR, compose_config, to_app_config\n"
              "from gateway.config import compose_gateway_config\n"
              "print(CONF_DIR, to_app_config(compose_config(['model=tiny'])).model.name, "
              "compose_gateway_config([]).limits.requests_per_hour)\n")
    env = {k: v for k, v in os.environ.items() if k != "FEDERATED_DP_LLM_CONF"}
    composed = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120, cwd=tmp_path,
                              env={**env, "PYTHONPATH": str(site)})  # the installed copy, not this checkout
    assert composed.returncode == 0, composed.stderr[-2000:]
    assert composed.stdout.split() == [str(site / "fl_core" / "conf"), "tiny", "30"]


def test_the_serverapp_runner_exports_training_epsilon_to_prometheus_only() -> None:
    manifests = render({"supernodes": HOSPITALS})
    (runner,) = [m for m in manifests if m["kind"] == "Deployment" and m["metadata"]["name"].endswith("serverapp")]
    template = runner["spec"]["template"]
    env = {e["name"]: e.get("value") for e in template["spec"]["containers"][0]["env"]}
    assert env["FL_TRAINING_METRICS_PORT"] == "9100" and env["FL_TRAINING_METRICS_HOST"] == "0.0.0.0"
    assert template["metadata"]["annotations"] == {"prometheus.io/scrape": "true", "prometheus.io/port": "9100"}
    (policy,) = [m for m in manifests if m["kind"] == "NetworkPolicy" and m["metadata"]["name"].endswith("serverapp")]
    assert [port["port"] for rule in policy["spec"]["ingress"] for port in rule["ports"]] == [9100]
    off = render({"supernodes": HOSPITALS, "serverapp": {"metricsPort": None}})
    (quiet,) = [m for m in off if m["kind"] == "NetworkPolicy" and m["metadata"]["name"].endswith("serverapp")]
    assert quiet["spec"]["ingress"] == []  # no metrics: the runner answers nothing
    dashboard = (REPO / "docker" / "monitoring" / "grafana-dashboard.json").read_text()
    assert "training_epsilon" in dashboard


BACKUP = {"backup": {"enabled": True, "claim": "backups"}, "supernodes": HOSPITALS, **SERVING}


def test_every_store_is_backed_up_beside_its_pod_with_commands_fl_backup_takes() -> None:
    from fl_client.node import LEDGER_FILE
    from fl_core.backup_cli import _parser

    manifests = render(BACKUP)
    version = kubernetes_validate.latest_version()
    for manifest in manifests:
        kubernetes_validate.validate(manifest, version, strict=True)
    owners = {m["metadata"]["name"]: m for m in manifests if m["kind"] in ("StatefulSet", "Deployment")}
    jobs = {m["metadata"]["name"]: m["spec"]["jobTemplate"]["spec"]["template"]["spec"]
            for m in manifests if m["kind"] == "CronJob"}
    prefix = "fed-federated-dp-llm-"
    stores = ("superlink", "mlflow", "redis", *(f"hospital-{h}" for h in "abc"))
    assert sorted(jobs) == sorted(f"{prefix}backup-{store}" for store in stores)

    def args_of(container: dict[str, Any]) -> list[str]:
        return [*container.get("command", []), *container.get("args", [])]

    # Each job mounts the volume its store's pod writes, runs on that pod's node, and names the files it writes
    # (a node's ledger is LEDGER_FILE in the state-dir of its config).
    state_dirs = {m["metadata"]["name"]: tomllib.loads(m["data"]["node.toml"])["state-dir"]
                  for m in manifests if m["kind"] == "ConfigMap" and "node.toml" in m.get("data", {})}
    expected = {
        "superlink": (owners[f"{prefix}superlink"], "state", ["--sqlite", "superlink=/var/lib/superlink/superlink.db"]),
        "mlflow": (owners[f"{prefix}mlflow"], "data", ["--sqlite", "mlflow=/var/lib/mlflow/mlflow.db",
                                                       "--folder", "artifacts=/var/lib/mlflow/artifacts"]),
        **{f"hospital-{h}": (owners[f"{prefix}hospital-{h}"], "state",
                             ["--sqlite", f"ledger=/var/lib/node/{LEDGER_FILE}"]) for h in "abc"},
    }
    for short, (owner, volume, items) in expected.items():
        job = jobs[f"{prefix}backup-{short}"]
        (container,) = job["containers"]
        command = args_of(container)
        assert command[:2] == ["fl-backup", "create"] and command[2:-1] == ["--to=/backups", *items]
        assert _parser().parse_args(command[1:]).keep == 14  # the command line fl-backup itself takes
        owner_args = " ".join(args_of(owner["spec"]["template"]["spec"]["containers"][0]))
        for path in (p.split("=", 1)[1] for p in items[1::2]):
            if owner["metadata"]["name"] in state_dirs:
                assert path == f"{state_dirs[owner['metadata']['name']]}/{LEDGER_FILE}"
            else:
                assert path in owner_args  # the file the owner is told to write
        claim = next(v["persistentVolumeClaim"]["claimName"] for v in job["volumes"] if v["name"] == "source")
        if owner["kind"] == "StatefulSet":
            assert claim == f"{volume}-{owner['metadata']['name']}-0"
            assert volume in [t["metadata"]["name"] for t in owner["spec"]["volumeClaimTemplates"]]
        else:
            assert claim == next(v["persistentVolumeClaim"]["claimName"] for v in
                                 owner["spec"]["template"]["spec"]["volumes"] if v["name"] == volume)
        mount = next(m["mountPath"] for m in container["volumeMounts"] if m["name"] == "source")
        owner_mount = next(m["mountPath"] for m in owner["spec"]["template"]["spec"]["containers"][0]["volumeMounts"]
                           if m["name"] == volume)
        assert mount == owner_mount and all(p.split("=", 1)[1].startswith(mount) for p in items[1::2])
        (term,) = job["affinity"]["podAffinity"]["requiredDuringSchedulingIgnoredDuringExecution"]
        assert term["topologyKey"] == "kubernetes.io/hostname"
        selected = term["labelSelector"]["matchLabels"]
        assert selected.items() <= owner["spec"]["template"]["metadata"]["labels"].items()
        others = [o for o in owners.values() if o is not owner]
        assert not any(selected.items() <= o["spec"]["template"]["metadata"]["labels"].items() for o in others)
        assert {"name": "backups", "persistentVolumeClaim": {"claimName": "backups"}} in job["volumes"]
        assert {"name": "backups", "mountPath": "/backups", "subPath": short} in container["volumeMounts"]
    # The gateways' limits and privacy spend: copied from the Redis they use, with the password they use (from its
    # Secret, in the variable fl-backup reads by default), over the network from any node, more often than the rest;
    # the Redis admits this job and no other backup job.
    gateway = owners[f"{prefix}gateway"]["spec"]["template"]["spec"]
    (copier,) = jobs[f"{prefix}backup-redis"]["containers"]
    command = args_of(copier)
    parsed = _parser().parse_args(command[1:])
    (item,) = parsed.items
    assert item.kind == "redis" and f"limits.redis_url={item.source}" in args_of(gateway["containers"][0])
    assert parsed.keep == 14 * 24  # hourly copies: 14 days of them, as the other stores keep 14 daily ones
    password = next(e for e in gateway["containers"][0]["env"] if e["name"] == "FL_GATEWAY_REDIS_PASSWORD")
    assert copier["env"] == [{**password, "name": parsed.redis_password_env}]
    assert not SECRETISH.search(" ".join(command).replace("--redis-password-env", ""))
    assert "affinity" not in jobs[f"{prefix}backup-redis"]  # not bound beside the pod: it reads over the network
    assert [m["name"] for m in copier["volumeMounts"]] == ["backups"]
    crons = {m["metadata"]["name"]: m for m in manifests if m["kind"] == "CronJob"}
    assert crons[f"{prefix}backup-redis"]["spec"]["schedule"] == "7 * * * *"  # hourly: what a restore gives back
    redis_policy = next(m for m in manifests if m["kind"] == "NetworkPolicy" and m["metadata"]["name"] ==
                        f"{prefix}redis")
    assert admitted(redis_policy, crons[f"{prefix}backup-redis"]["spec"]["jobTemplate"]["spec"]["template"], 6379)
    assert not any(admitted(redis_policy, cron["spec"]["jobTemplate"]["spec"]["template"], 6379)
                   for name, cron in crons.items() if name != f"{prefix}backup-redis")
    # Every gateway pod backs up its own log and head, the head first, as the gateway names them.
    serve, sidecar = gateway["containers"]
    script = " ".join(args_of(sidecar))
    head = next(a.split("=", 1)[1] for a in args_of(serve) if a.startswith("audit.head_path="))
    log = next(a.split("=", 1)[1] for a in args_of(serve) if a.startswith("audit.path="))
    assert script.index(f"--file=audit-head={head}") < script.index(f"--sqlite=audit={log}")
    create = script[script.index("fl-backup create"):script.index(";", script.index("fl-backup create"))].split()
    _parser().parse_args(create[1:])
    assert {"name": "backups", "persistentVolumeClaim": {"claimName": "backups"}} in gateway["volumes"]
    assert {"name": "backups", "mountPath": "/backups", "subPathExpr": "gateway/$(POD_NAME)"} in \
        sidecar["volumeMounts"]  # a gateway, which faces the network, sees its own backups only
    assert "$(POD_NAME)" in script and any(e["name"] == "POD_NAME" for e in sidecar["env"])
    isolated = next(m for m in manifests if m["kind"] == "NetworkPolicy" and m["metadata"]["name"].endswith("-backup"))
    assert isolated["spec"]["policyTypes"] == ["Ingress"] and "ingress" not in isolated["spec"]
    for cron in (m for m in manifests if m["kind"] == "CronJob"):
        labels = cron["spec"]["jobTemplate"]["spec"]["template"]["metadata"]["labels"]
        assert isolated["spec"]["podSelector"]["matchLabels"].items() <= labels.items()
        assert 0 < cron["spec"]["startingDeadlineSeconds"] <= 3600  # after an outage: the next run, not a late one
    for pod in [*jobs.values(), gateway]:
        assert pod["securityContext"]["runAsNonRoot"] is True and pod["automountServiceAccountToken"] is False
        for container in pod["containers"]:
            assert container["securityContext"]["readOnlyRootFilesystem"] is True


def test_backups_without_a_volume_to_hold_them_fail_to_render_naming_the_value() -> None:
    with pytest.raises(Exception, match=r"backup\.claim"):
        render({"backup": {"enabled": True}})
    assert not [m for m in render({"supernodes": HOSPITALS}) if m["kind"] == "CronJob"]  # off by default


def test_rollouts_and_drains_take_down_one_serving_pod_at_a_time_and_wait_for_ready() -> None:
    manifests = render(SERVING)
    budgets = {m["metadata"]["name"]: m for m in manifests if m["kind"] == "PodDisruptionBudget"}
    for component in ("gateway", "replica"):
        workload = next(m for m in manifests
                        if m["kind"] == "StatefulSet" and m["metadata"]["name"].endswith(component))
        spec = workload["spec"]
        assert spec["updateStrategy"] == {"type": "RollingUpdate", "rollingUpdate": {"maxUnavailable": 1}}
        assert spec["minReadySeconds"] > 0 and "readinessProbe" in spec["template"]["spec"]["containers"][0]
        budget = budgets[f"fed-federated-dp-llm-{component}"]["spec"]
        assert budget["maxUnavailable"] == 1
        assert budget["selector"]["matchLabels"].items() <= spec["template"]["metadata"]["labels"].items()
    two = render({**SERVING, "serving": {**SERVING["serving"], "maxUnavailable": 2}})
    assert {m["spec"]["maxUnavailable"] for m in two if m["kind"] == "PodDisruptionBudget"} == {2}


# Blue-green (README "Rollouts"): blue has the federation, Redis, MLflow and the clients' Service, and names green's
# release; green is the other slot, serving under blue's Service on blue's Redis and MLflow.
BLUE = {"serving": {**SERVING["serving"], "gateway": {**SERVING["serving"]["gateway"], "slot": "blue",
                                                      "service": {"otherRelease": "green"}}},
        "backup": {"enabled": True, "claim": "backups"}}
GREEN = {"superlink": {"enabled": False},
         "mlflow": {"enabled": False, "url": "http://blue-federated-dp-llm-mlflow:5000"},
         "serving": {"enabled": True, "replica": {"modelSource": "models:/federated-dp-llm/4"},
                     "gateway": {"slot": "green", "clientCertificates": True,
                                 "service": {"enabled": False, "name": "blue-federated-dp-llm-gateway"}},
                     "redis": {"address": "blue-federated-dp-llm-redis:6379"}},
         "backup": {"enabled": True, "claim": "backups"}}


def switched(values: dict[str, Any], **serving: Any) -> dict[str, Any]:
    """The values with serving.gateway.service.liveSlot and other serving values set, as `helm upgrade --set`."""
    live = serving.pop("live_slot", None)
    gateway = values["serving"]["gateway"]
    if live:
        gateway = {**gateway, "service": {**gateway.get("service", {}), "liveSlot": live}}
    return {**values, "serving": {**values["serving"], "gateway": gateway, **serving}}


def pods_of(manifests: list[dict[str, Any]], component: str) -> list[dict[str, Any]]:
    return [m["spec"]["template"] for m in manifests if m["kind"] in ("Deployment", "StatefulSet")
            and m["spec"]["template"]["metadata"]["labels"]["app.kubernetes.io/component"] == component]


def selects(selector: dict[str, str], pod: dict[str, Any]) -> bool:
    return selector.items() <= pod["metadata"]["labels"].items()


def admitted(policy: dict[str, Any], pod: dict[str, Any], port: int) -> bool:
    """Whether a NetworkPolicy in the pod's namespace admits it on the port (podSelector peers only)."""
    peers = [peer["podSelector"]["matchLabels"] for rule in policy["spec"]["ingress"] if {"port": port} in rule["ports"]
             for peer in rule.get("from", []) if set(peer) == {"podSelector"}]
    return any(selects(peer, pod) for peer in peers)


def test_blue_green_releases_share_redis_and_mlflow_and_one_service_selects_the_live_slot(tmp_path: Path) -> None:
    blue, green = render(BLUE, "blue"), render(GREEN, "green")
    version = kubernetes_validate.latest_version()
    for manifest in [*blue, *green]:
        kubernetes_validate.validate(manifest, version, strict=True)
    components = {m["metadata"]["labels"]["app.kubernetes.io/component"] for m in green}
    assert components == {"gateway", "replica"}  # no Redis, SuperLink, runner, MLflow or backup job of its own
    assert not [m for m in green if m["kind"] == "Service" and m["metadata"]["name"] == "blue-federated-dp-llm-gateway"]
    (service,) = [m for m in blue if m["kind"] == "Service" and m["metadata"]["name"].endswith("-gateway")]
    assert service["metadata"]["name"] == "blue-federated-dp-llm-gateway"
    (blue_gateway,), (green_gateway,) = pods_of(blue, "gateway"), pods_of(green, "gateway")
    pods = [*pods_of(blue, "replica"), *pods_of(green, "replica"), *pods_of(blue, "redis"), *pods_of(blue, "mlflow")]

    # The Service sends clients to blue's gateway pods alone; `--set serving.gateway.service.liveSlot=green` on blue
    # moves its selector to green's, and changes nothing else in blue.
    # A third release in the green slot under the same Service name is never served: the selector names the release.
    (stray_gateway,), (stray_replica,) = (pods_of(render(GREEN, "green-2"), c) for c in ("gateway", "replica"))
    assert service["spec"]["selector"]["app.kubernetes.io/instance"] == "blue"
    assert selects(service["spec"]["selector"], blue_gateway)
    assert not any(selects(service["spec"]["selector"], pod) for pod in [green_gateway, stray_gateway, *pods])
    live_green = render(switched(BLUE, live_slot="green"), "blue")
    (moved,) = [m for m in live_green if m["kind"] == "Service" and m["metadata"] == service["metadata"]]
    assert moved["spec"]["selector"]["app.kubernetes.io/instance"] == "green"
    assert selects(moved["spec"]["selector"], green_gateway)
    assert not any(selects(moved["spec"]["selector"], pod) for pod in [blue_gateway, stray_gateway, *pods])
    assert [m for m in live_green if m is not moved] == [m for m in blue if m is not service]

    # Green's gateway speaks to blue's Redis with the password blue's Redis requires; its replicas load from blue's
    # MLflow; blue's policies admit green's gateway and replicas there, and nothing else of green.
    (redis,) = pods_of(blue, "redis")
    secret = {"secretKeyRef": {"name": "gateway-redis", "key": "password"}}
    assert {"name": "REDISCLI_AUTH", "valueFrom": secret} in redis["spec"]["containers"][0]["env"]
    container = green_gateway["spec"]["containers"][0]
    assert {"name": "FL_GATEWAY_REDIS_PASSWORD", "valueFrom": secret} in container["env"]
    for name in ("tls.crt", "tls.key", "ca.crt"):
        (tmp_path / name).write_text("")
    args = [a.replace("/run/secrets/tls", str(tmp_path)).replace("$(POD_NAME)", "pod-0")
            for a in container["command"][container["command"].index("serve") + 1:]]
    cfg = compose_gateway_config(args)
    (redis_service,) = [m for m in blue if m["kind"] == "Service" and m["metadata"]["name"].endswith("-redis")]
    assert cfg.limits.redis_url == f"redis://{redis_service['metadata']['name']}:6379/0"
    assert cfg.limits.redis_password_env == "FL_GATEWAY_REDIS_PASSWORD"
    tls = switched(GREEN, redis={**GREEN["serving"]["redis"], "tls": {"enabled": True}})  # blue's Redis on TLS
    (tls_gateway,) = pods_of(render(tls, "green"), "gateway")
    assert f"limits.redis_url=rediss://{redis_service['metadata']['name']}:6379/0" in \
        tls_gateway["spec"]["containers"][0]["command"]
    assert {"name": "redis-ca", "secret": {"secretName": "redis-tls", "items": [{"key": "ca.crt", "path": "ca.crt"}]}} \
        in tls_gateway["spec"]["volumes"]
    assert cfg.routing.backends == [f"http://green-federated-dp-llm-replica-{i}.green-federated-dp-llm-replica:9000"
                                    for i in range(2)]  # green's own replicas, with the new model
    (mlflow_service,) = [m for m in blue if m["kind"] == "Service" and m["metadata"]["name"].endswith("-mlflow")]
    for replica in pods_of(green, "replica"):
        env = {e["name"]: e.get("value") for e in replica["spec"]["containers"][0]["env"]}
        assert env["MLFLOW_TRACKING_URI"] == f"http://{mlflow_service['metadata']['name']}:5000"
    policies = {m["metadata"]["name"]: m for m in [*blue, *green] if m["kind"] == "NetworkPolicy"}
    (green_replica,) = pods_of(green, "replica")
    assert admitted(policies["blue-federated-dp-llm-redis"], green_gateway, 6379)
    assert not admitted(policies["blue-federated-dp-llm-redis"], green_replica, 6379)
    assert admitted(policies["blue-federated-dp-llm-mlflow"], green_replica, 5000)
    assert not admitted(policies["blue-federated-dp-llm-mlflow"], green_gateway, 5000)
    assert admitted(policies["green-federated-dp-llm-replica"], green_gateway, 9000)
    assert not admitted(policies["green-federated-dp-llm-replica"], blue_gateway, 9000)
    assert not admitted(policies["blue-federated-dp-llm-redis"], {"metadata": {"labels": {
        "app.kubernetes.io/component": "gateway", "federated-dp-llm/gateway-service": "other-gateway"}}}, 6379)
    assert not admitted(policies["blue-federated-dp-llm-redis"], stray_gateway, 6379)
    assert not admitted(policies["blue-federated-dp-llm-mlflow"], stray_replica, 5000)

    # Each release keeps its own: budgets for its own pods, and each gateway pod its own audit volumes and backups.
    for release, others in ((blue, green), (green, blue)):
        for budget in (m for m in release if m["kind"] == "PodDisruptionBudget"):
            assert not any(selects(budget["spec"]["selector"]["matchLabels"], pod)
                           for pod in [*pods_of(others, "gateway"), *pods_of(others, "replica")])
    (blue_sts,), (green_sts,) = ([m for m in r if m["kind"] == "StatefulSet" and m["metadata"]["name"].endswith(
        "-gateway")] for r in (blue, green))
    assert blue_sts["metadata"]["name"] != green_sts["metadata"]["name"]  # claims audit-<statefulset>-N apart
    for gateway in (blue_gateway, green_gateway):
        sidecar = gateway["spec"]["containers"][1]
        assert {"name": "backups", "mountPath": "/backups", "subPathExpr": "gateway/$(POD_NAME)"} in \
            sidecar["volumeMounts"]
    assert {m["metadata"]["name"] for m in blue if m["kind"] == "CronJob"} == {
        "blue-federated-dp-llm-backup-superlink", "blue-federated-dp-llm-backup-mlflow",
        "blue-federated-dp-llm-backup-redis"}  # the Redis both slots use: blue's, backed up by blue


def test_a_retired_slot_keeps_redis_and_the_service_and_cannot_be_the_live_one() -> None:
    retired = render(switched(BLUE, live_slot="green", retired=True), "blue")
    version = kubernetes_validate.latest_version()
    for manifest in retired:
        kubernetes_validate.validate(manifest, version, strict=True)
    assert pods_of(retired, "redis") and not pods_of(retired, "gateway") and not pods_of(retired, "replica")
    assert not [m for m in retired if m["kind"] in ("PodDisruptionBudget", "HorizontalPodAutoscaler")]
    (service,) = [m for m in retired if m["kind"] == "Service" and m["metadata"]["name"].endswith("-gateway")]
    assert service["spec"]["selector"]["federated-dp-llm/slot"] == "green"
    (policy,) = [m for m in retired if m["kind"] == "NetworkPolicy" and m["metadata"]["name"].endswith("-redis")]
    assert admitted(policy, pods_of(render(GREEN, "green"), "gateway")[0], 6379)


@pytest.mark.parametrize(("values", "named"), [
    (switched(GREEN, redis={**GREEN["serving"]["redis"], "passwordSecret": None}), "serving.redis.passwordSecret"),
    ({**GREEN, "serving": {**GREEN["serving"], "gateway": {"service": GREEN["serving"]["gateway"]["service"]}}},
     "serving.gateway.slot"),
    (switched(GREEN, gateway={"slot": "green", "service": {"enabled": False}}), "serving.gateway.service.name"),
    (switched(GREEN, live_slot="green"), "serving.gateway.service.liveSlot"),
    (switched(GREEN, redis={"passwordSecret": "gateway-redis"}), "serving.redis.address"),  # budgets from zero
    (switched(GREEN, retired=True), "serving.retired"),  # only blue sees whether green is live
    (switched(GREEN, gateway={**GREEN["serving"]["gateway"], "service": {
        **GREEN["serving"]["gateway"]["service"], "otherRelease": "blue"}}), "serving.gateway.service.otherRelease"),
    (switched(BLUE, gateway={**BLUE["serving"]["gateway"], "service": {"liveSlot": "green"}}),
     "serving.gateway.service.otherRelease"),
    (switched(BLUE, gateway={**BLUE["serving"]["gateway"], "service": {"otherRelease": "fed"}}),
     "serving.gateway.service.otherRelease"),
    (switched(SERVING, gateway={"service": {"otherRelease": "green"}}), "serving.gateway.service.otherRelease"),
    (switched(SERVING, gateway={"service": {"liveSlot": "green"}}), "serving.gateway.service.liveSlot"),
    (switched(BLUE, retired=True), "serving.retired"),
    ({**GREEN, "mlflow": {"enabled": False}}, "mlflow.url"),
    ({**BLUE, "mlflow": {"url": "http://elsewhere:5000"}}, "mlflow.url"),
    ({"superlink": {"enabled": False}, "supernodes": HOSPITALS[:1]}, "supernodes[hospital-a].superlinkAddress"),
])
def test_a_blue_green_setting_that_cannot_work_fails_in_one_line_naming_it(values: dict[str, Any], named: str) -> None:
    with pytest.raises(Exception) as refused:
        render(values)
    message = str(refused.value).strip()
    assert named + ":" in message and "\n" not in message


def test_the_gate_fails_on_a_high_severity_finding_and_a_known_vulnerability(tmp_path: Path) -> None:
    sys.path.insert(0, str(REPO))
    from scripts.check_deploy import audit_findings, bandit_findings

    assert bandit_findings([REPO / p for p in ("fl_core", "gateway", "privacy")]) == []
    (tmp_path / "runner.py").write_text("import subprocess\n\n\ndef run(name):\n"
                                        "    return subprocess.call('ls ' + name, shell=True)\n")
    (finding,) = bandit_findings([tmp_path])
    assert finding.startswith(f"{tmp_path / 'runner.py'}:5 B602")
    # pip-audit's JSON: one package with a known vulnerability, one checked clean, one the service did not answer for.
    report = {"dependencies": [
        {"name": "jinja2", "version": "3.1.2", "vulns": [{"id": "GHSA-h5c8-rqwp-cp95", "fix_versions": ["3.1.3"]}]},
        {"name": "numpy", "version": "2.3.0", "vulns": []},
        {"name": "torch", "version": "2.13.0", "skip_reason": "Dependency not found on PyPI and could not be audited"}]}
    assert audit_findings(report) == (["jinja2 3.1.2: GHSA-h5c8-rqwp-cp95 (fixed in 3.1.3)"], 1, 2)


def test_traces_go_where_the_operator_says_and_nowhere_by_default() -> None:
    def environments(values: dict[str, Any]) -> dict[str, dict[str, str]]:
        return {c["name"]: {e["name"]: e.get("value", "") for e in c.get("env", [])}
                for pod in pod_specs(render(values)) for c in pod["containers"]}

    deployment = {**SERVING, "supernodes": HOSPITALS}
    assert not any("OTEL_TRACES_EXPORTER" in env for env in environments(deployment).values())
    endpoint = "http://jaeger-collector.observability:4318"
    traced = environments({**deployment, "tracing": {"otlpEndpoint": endpoint}})
    for container, service in (("gateway", "fl-gateway"), ("replica", "fl-gateway-replica"),
                               ("serverapp", "fl-serverapp")):
        assert traced[container]["OTEL_TRACES_EXPORTER"] == "otlp"
        assert (traced[container]["OTEL_EXPORTER_OTLP_ENDPOINT"], traced[container]["OTEL_SERVICE_NAME"]) == (
            endpoint, service)
    assert not any("OTEL_TRACES_EXPORTER" in traced[c] for c in ("supernode", "superlink", "mlflow"))  # nodes: none
