"""Tests for the Helm chart in helm/euroute.

The static tests (YAML parsing, values schema, value references) need no helm
binary. The rendering tests run `helm lint` / `helm template` and are skipped
when `helm` is not on PATH.
"""

from __future__ import annotations

import copy
import json
import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
CHART = ROOT / "helm" / "euroute"
HELM = shutil.which("helm")
RELEASE = "euroute-test"
NAMESPACE = "euroute"
POLICY_DIR = "/etc/euroute/policies"

needs_helm = pytest.mark.skipif(HELM is None, reason="helm binary not found on PATH")

SAMPLE_POLICIES = {
    "routes.yaml": (
        "routes:\n"
        "  - id: mistral-eu/magistral-small-2509\n"
        "    provider: mistral\n"
        "    upstream_model: magistral-small-2509\n"
        "    public_model: mistral/magistral-small-2509\n"
        "    inference_location: FR\n"
        "    storage_location: FR\n"
    ),
    "contracts.yaml": "contracts:\n  mistral:\n    zero_data_retention: false\n",
    "apps.yaml": "apps:\n  example-app: eu-strict\n",
    "eu-strict.policy.yaml": "name: eu-strict\nrequire:\n  residency: EU\n",
}

SAMPLE_VALUES: dict[str, Any] = {
    "database": {"existingSecret": "euroute-db"},
    "mistral": {"existingSecret": "euroute-mistral"},
    "pseudonym": {"existingSecret": "euroute-pseudonym"},
    "policies": {"files": SAMPLE_POLICIES},
}


def load_yaml(path: Path) -> Any:
    return yaml.safe_load(path.read_text(encoding="utf-8"))


def deep_merge(base: dict, override: dict) -> dict:
    out = copy.deepcopy(base)
    for key, value in override.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = deep_merge(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


def with_values(**overrides: Any) -> dict:
    return deep_merge(SAMPLE_VALUES, overrides)


# --------------------------------------------------------------------------
# Static checks (no helm needed)
# --------------------------------------------------------------------------


def plain_yaml_files() -> list[Path]:
    files = sorted(p for p in CHART.rglob("*") if p.suffix in (".yaml", ".yml"))
    return [p for p in files if "{{" not in p.read_text(encoding="utf-8")]


def test_plain_yaml_files_parse():
    files = plain_yaml_files()
    names = {p.relative_to(CHART).as_posix() for p in files}
    assert {"Chart.yaml", "values.yaml"} <= names
    for path in files:
        assert load_yaml(path) is not None, f"{path} is empty"


def test_chart_metadata():
    chart = load_yaml(CHART / "Chart.yaml")
    assert chart["apiVersion"] == "v2"
    assert chart["name"] == "euroute"
    assert chart["version"] == "0.1.0"
    assert chart["appVersion"] == "0.1.0"  # a string, not a float
    assert chart.get("type", "application") == "application"


def test_values_defaults():
    values = load_yaml(CHART / "values.yaml")
    assert values["image"]["repository"] == "ghcr.io/example/euroute"
    assert values["image"]["tag"] == ""  # defaults to the chart appVersion
    assert values["replicaCount"] == 2
    assert values["database"] == {"existingSecret": "", "secretKey": "database-url", "port": 5432}
    assert values["mistral"]["secretKey"] == "api-key"
    assert values["pseudonym"]["secretKey"] == "pseudonym-key"
    assert values["policies"]["files"] == {}
    assert values["policies"]["existingConfigMap"] == ""
    assert values["policies"]["restartOnChange"] is False
    assert values["resources"]["requests"] == {"cpu": "100m", "memory": "256Mi"}
    assert values["resources"]["limits"]["memory"] == "512Mi"
    assert values["terminationGracePeriodSeconds"] == 30
    assert values["service"] == {"type": "ClusterIP", "port": 80, "annotations": {}}
    assert values["containerPort"] == 8080
    assert values["podDisruptionBudget"]["enabled"] is True
    assert values["podDisruptionBudget"]["minAvailable"] == 1
    assert values["autoscaling"]["enabled"] is False
    assert values["ingress"]["enabled"] is False
    assert values["networkPolicy"]["enabled"] is False
    assert values["metrics"]["serviceMonitor"]["enabled"] is False
    assert values["serviceAccount"]["automountServiceAccountToken"] is False
    sc = values["securityContext"]
    assert sc["readOnlyRootFilesystem"] is True
    assert sc["runAsNonRoot"] is True
    assert sc["allowPrivilegeEscalation"] is False
    assert sc["capabilities"]["drop"] == ["ALL"]
    assert values["podSecurityContext"]["seccompProfile"]["type"] == "RuntimeDefault"
    assert values["livenessProbe"]["httpGet"]["path"] == "/healthz"
    assert values["readinessProbe"]["httpGet"]["path"] == "/readyz"
    assert values["migration"]["enabled"] is True


def _lookup(values: dict, dotted: str) -> bool:
    node: Any = values
    for part in dotted.split("."):
        if not isinstance(node, dict) or part not in node:
            return False
        node = node[part]
    return True


def test_templates_only_reference_values_defined_in_values_yaml():
    values = load_yaml(CHART / "values.yaml")
    pattern = re.compile(r"\.Values((?:\.[A-Za-z_][A-Za-z0-9_]*)+)")
    missing = set()
    for tpl in (CHART / "templates").iterdir():
        for match in pattern.finditer(tpl.read_text(encoding="utf-8")):
            path = match.group(1)[1:]
            if not _lookup(values, path):
                missing.add(f"{tpl.name}: .Values.{path}")
    assert not missing, f"values used by templates but not defined in values.yaml: {sorted(missing)}"


def test_schema_covers_every_top_level_value():
    values = load_yaml(CHART / "values.yaml")
    schema = json.loads((CHART / "values.schema.json").read_text(encoding="utf-8"))
    assert set(values) <= set(schema["properties"])


@pytest.fixture(scope="module")
def validator():
    jsonschema = pytest.importorskip("jsonschema")
    schema = json.loads((CHART / "values.schema.json").read_text(encoding="utf-8"))
    jsonschema.Draft7Validator.check_schema(schema)
    return jsonschema.Draft7Validator(schema)


def _errors(validator, values: dict) -> list[str]:
    return [e.message for e in validator.iter_errors(values)]


def test_values_yaml_matches_schema(validator):
    values = load_yaml(CHART / "values.yaml")
    assert _errors(validator, values) == []


def test_sample_and_ci_values_match_schema(validator):
    defaults = load_yaml(CHART / "values.yaml")
    assert _errors(validator, deep_merge(defaults, SAMPLE_VALUES)) == []
    for path in sorted((CHART / "ci").glob("*.yaml")):
        assert _errors(validator, deep_merge(defaults, load_yaml(path))) == [], path


@pytest.mark.parametrize(
    "override",
    [
        {"replicaCount": "two"},
        {"replicaCount": -1},
        {"image": {"pullPolicy": "Sometimes"}},
        {"image": {"repository": ""}},
        {"database": {"existingSecret": "Not_A_Valid_Name"}},
        {"database": {"secretKey": ""}},
        {"policies": {"files": {"../evil.yaml": "x: 1"}}},
        {"policies": {"files": {"routes.yaml": 42}}},
        {"policies": {"restartOnChange": "yes"}},
        {"service": {"type": "ExternalName"}},
        {"preStop": {"mode": "signal"}},
        {"logLevel": "LOUD"},
        {"replicas": 3},  # typo of replicaCount: unknown keys are rejected
        {"networkPolicy": {"enabled": True, "egress": []}},
        {"metrics": {"serviceMonitor": {"interval": "often"}}},
    ],
)
def test_schema_rejects_bad_values(validator, override):
    values = deep_merge(load_yaml(CHART / "values.yaml"), override)
    assert _errors(validator, values), f"schema accepted {override}"


# --------------------------------------------------------------------------
# Rendering checks (need helm)
# --------------------------------------------------------------------------


def run_helm(args: list[str], values: dict | None, tmp_path: Path) -> subprocess.CompletedProcess:
    cmd = [HELM, *args]
    if values is not None:
        values_file = tmp_path / "values-under-test.yaml"
        values_file.write_text(yaml.safe_dump(values, sort_keys=False), encoding="utf-8")
        cmd += ["-f", str(values_file)]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=300, check=False)


def render(values: dict | None, tmp_path: Path) -> list[dict]:
    proc = run_helm(["template", RELEASE, str(CHART), "--namespace", NAMESPACE], values, tmp_path)
    assert proc.returncode == 0, proc.stderr
    return [doc for doc in yaml.safe_load_all(proc.stdout) if doc]


def by_kind(docs: list[dict], kind: str) -> list[dict]:
    return [d for d in docs if d.get("kind") == kind]


def one(docs: list[dict], kind: str) -> dict:
    found = by_kind(docs, kind)
    assert len(found) == 1, f"expected one {kind}, got {len(found)}"
    return found[0]


def env_map(container: dict) -> dict[str, dict]:
    return {e["name"]: e for e in container.get("env", [])}


def server_container(docs: list[dict]) -> dict:
    containers = one(docs, "Deployment")["spec"]["template"]["spec"]["containers"]
    return next(c for c in containers if c["name"] == "euroute")


@pytest.fixture
def docs(tmp_path):
    return render(SAMPLE_VALUES, tmp_path)


@needs_helm
def test_helm_lint(tmp_path):
    proc = run_helm(["lint", str(CHART), "--strict"], SAMPLE_VALUES, tmp_path)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    for ci_values in sorted((CHART / "ci").glob("*.yaml")):
        proc = run_helm(["lint", str(CHART), "--strict", "-f", str(ci_values)], None, tmp_path)
        assert proc.returncode == 0, proc.stdout + proc.stderr


@needs_helm
def test_migration_job_is_a_pre_install_pre_upgrade_hook(docs):
    job = one(docs, "Job")
    annotations = job["metadata"]["annotations"]
    assert set(annotations["helm.sh/hook"].split(",")) == {"pre-install", "pre-upgrade"}
    assert "helm.sh/hook-weight" in annotations
    assert set(annotations["helm.sh/hook-delete-policy"].split(",")) == {
        "before-hook-creation",
        "hook-succeeded",
    }
    pod = job["spec"]["template"]["spec"]
    assert pod["restartPolicy"] == "Never"
    (container,) = pod["containers"]
    argv = [*container.get("command", []), *container.get("args", [])]
    assert " ".join(argv) == "euroute migrate"
    ref = env_map(container)["EUROUTE_DATABASE_URL"]["valueFrom"]["secretKeyRef"]
    assert ref == {"name": "euroute-db", "key": "database-url"}
    # The hook runs before the chart's own resources exist: it must not need them.
    assert not any("configMap" in v for v in pod.get("volumes", []))
    assert pod["serviceAccountName"] == "default"


@needs_helm
def test_deployment_runs_the_server_without_migrating(docs):
    container = server_container(docs)
    argv = [*container.get("command", []), *container.get("args", [])]
    assert argv[:2] == ["euroute", "serve"]
    assert argv[argv.index("--host") + 1] == "0.0.0.0"
    assert argv[argv.index("--port") + 1] == "8080"
    assert argv[argv.index("--workers") + 1] == "1"
    env = env_map(container)
    assert env["EUROUTE_MIGRATE_ON_START"]["value"] == "false"
    assert env["EUROUTE_DATABASE_URL"]["valueFrom"]["secretKeyRef"] == {
        "name": "euroute-db",
        "key": "database-url",
    }
    assert "value" not in env["EUROUTE_DATABASE_URL"]
    assert env["MISTRAL_API_KEY"]["valueFrom"]["secretKeyRef"] == {"name": "euroute-mistral", "key": "api-key"}
    assert env["EUROUTE_PSEUDONYM_KEY"]["valueFrom"]["secretKeyRef"] == {
        "name": "euroute-pseudonym",
        "key": "pseudonym-key",
    }
    assert env["EUROUTE_POLICY_DIR"]["value"] == POLICY_DIR
    assert env["EUROUTE_LOG_LEVEL"]["value"] == "INFO"
    assert "MISTRAL_BASE_URL" not in env


@needs_helm
def test_policies_configmap_is_mounted(docs):
    configmap = one(docs, "ConfigMap")
    assert set(configmap["data"]) == set(SAMPLE_POLICIES)
    for name, content in SAMPLE_POLICIES.items():
        assert yaml.safe_load(configmap["data"][name]) == yaml.safe_load(content)
    pod = one(docs, "Deployment")["spec"]["template"]["spec"]
    mount = next(m for m in server_container(docs)["volumeMounts"] if m["mountPath"] == POLICY_DIR)
    assert mount.get("readOnly") is True
    assert "subPath" not in mount  # subPath mounts never see ConfigMap updates
    volume = next(v for v in pod["volumes"] if v["name"] == mount["name"])
    assert volume["configMap"]["name"] == configmap["metadata"]["name"]
    annotations = one(docs, "Deployment")["spec"]["template"]["metadata"].get("annotations", {})
    assert "checksum/policies" not in annotations


@needs_helm
def test_probes(docs):
    container = server_container(docs)
    assert container["livenessProbe"]["httpGet"]["path"] == "/healthz"
    assert container["readinessProbe"]["httpGet"]["path"] == "/readyz"
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    assert ports == {"http": 8080}
    for probe in ("livenessProbe", "readinessProbe"):
        assert container[probe]["httpGet"]["port"] in ("http", 8080)


@needs_helm
def test_security_and_shutdown(docs):
    pod = one(docs, "Deployment")["spec"]["template"]["spec"]
    container = server_container(docs)
    assert pod["automountServiceAccountToken"] is False
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert pod["securityContext"]["seccompProfile"]["type"] == "RuntimeDefault"
    sc = container["securityContext"]
    assert sc["readOnlyRootFilesystem"] is True
    assert sc["allowPrivilegeEscalation"] is False
    assert sc["capabilities"]["drop"] == ["ALL"]
    tmp_mount = next(m for m in container["volumeMounts"] if m["mountPath"] == "/tmp")
    tmp_volume = next(v for v in pod["volumes"] if v["name"] == tmp_mount["name"])
    assert "emptyDir" in tmp_volume
    assert pod["terminationGracePeriodSeconds"] == 30
    assert container["lifecycle"]["preStop"]["exec"]["command"] == ["sleep", "5"]
    assert container["resources"]["requests"] == {"cpu": "100m", "memory": "256Mi"}
    assert container["resources"]["limits"]["memory"] == "512Mi"
    service_account = one(docs, "ServiceAccount")
    assert service_account["automountServiceAccountToken"] is False
    assert pod["serviceAccountName"] == service_account["metadata"]["name"]


@needs_helm
def test_service_and_pdb_select_only_server_pods(docs):
    deployment = one(docs, "Deployment")
    assert deployment["spec"]["replicas"] == 2
    pod_labels = deployment["spec"]["template"]["metadata"]["labels"]
    job_labels = one(docs, "Job")["spec"]["template"]["metadata"]["labels"]
    service = one(docs, "Service")
    assert service["spec"]["type"] == "ClusterIP"
    (port,) = service["spec"]["ports"]
    assert port["port"] == 80 and port["targetPort"] in ("http", 8080)
    pdb = one(docs, "PodDisruptionBudget")
    assert pdb["spec"]["minAvailable"] == 1
    for selector in (
        service["spec"]["selector"],
        pdb["spec"]["selector"]["matchLabels"],
        deployment["spec"]["selector"]["matchLabels"],
    ):
        assert selector.items() <= pod_labels.items()
        assert not selector.items() <= job_labels.items()


@needs_helm
def test_optional_resources_are_off_by_default(docs):
    kinds = {d["kind"] for d in docs}
    assert not kinds & {"Ingress", "HorizontalPodAutoscaler", "NetworkPolicy", "ServiceMonitor"}


@needs_helm
def test_optional_resources_render(tmp_path):
    values = with_values(
        autoscaling={"enabled": True, "minReplicas": 3, "maxReplicas": 6},
        ingress={"enabled": True, "className": "nginx", "tls": [{"secretName": "t", "hosts": ["euroute.example.com"]}]},
        networkPolicy={"enabled": True},
        metrics={"serviceMonitor": {"enabled": True}},
        mistral={"baseUrl": "https://mistral.internal.example/v1"},
        topologySpreadConstraints=[
            {"maxSkew": 1, "topologyKey": "topology.kubernetes.io/zone", "whenUnsatisfiable": "ScheduleAnyway"}
        ],
    )
    docs = render(values, tmp_path)
    deployment = one(docs, "Deployment")
    assert "replicas" not in deployment["spec"]
    hpa = one(docs, "HorizontalPodAutoscaler")
    assert hpa["spec"]["scaleTargetRef"]["name"] == deployment["metadata"]["name"]
    assert (hpa["spec"]["minReplicas"], hpa["spec"]["maxReplicas"]) == (3, 6)
    ingress = one(docs, "Ingress")
    backend = ingress["spec"]["rules"][0]["http"]["paths"][0]["backend"]["service"]
    assert backend == {"name": one(docs, "Service")["metadata"]["name"], "port": {"number": 80}}
    netpol = one(docs, "NetworkPolicy")
    assert set(netpol["spec"]["policyTypes"]) == {"Ingress", "Egress"}
    egress_ports = {(p["port"], p.get("protocol", "TCP")) for rule in netpol["spec"]["egress"] for p in rule["ports"]}
    assert egress_ports == {(53, "UDP"), (53, "TCP"), (5432, "TCP"), (443, "TCP")}
    monitor = one(docs, "ServiceMonitor")
    (endpoint,) = monitor["spec"]["endpoints"]
    assert endpoint["path"] == "/metrics" and endpoint["port"] == "http"
    env = env_map(server_container(docs))
    assert env["MISTRAL_BASE_URL"]["value"] == "https://mistral.internal.example/v1"
    (constraint,) = deployment["spec"]["template"]["spec"]["topologySpreadConstraints"]
    assert constraint["labelSelector"]["matchLabels"] == deployment["spec"]["selector"]["matchLabels"]


@needs_helm
def test_existing_configmap(tmp_path):
    values = copy.deepcopy(SAMPLE_VALUES)
    values["policies"] = {"existingConfigMap": "my-policies", "restartOnChange": True}
    docs = render(values, tmp_path)
    assert not by_kind(docs, "ConfigMap")
    pod = one(docs, "Deployment")["spec"]["template"]
    assert {"name": "my-policies"} in [v.get("configMap") for v in pod["spec"]["volumes"]]
    assert "checksum/policies" not in pod["metadata"].get("annotations", {})


@needs_helm
def test_restart_on_change_adds_policy_checksum(tmp_path):
    def checksum(files: dict) -> str:
        values = copy.deepcopy(SAMPLE_VALUES)
        values["policies"] = {"files": files, "restartOnChange": True}
        docs = render(values, tmp_path)
        return one(docs, "Deployment")["spec"]["template"]["metadata"]["annotations"]["checksum/policies"]

    first = checksum(SAMPLE_POLICIES)
    assert first == checksum(SAMPLE_POLICIES)
    assert first != checksum({**SAMPLE_POLICIES, "apps.yaml": "apps:\n  other-app: eu-strict\n"})


@needs_helm
def test_render_fails_clearly_without_policies(tmp_path):
    values = copy.deepcopy(SAMPLE_VALUES)
    del values["policies"]
    proc = run_helm(["template", RELEASE, str(CHART)], values, tmp_path)
    assert proc.returncode != 0
    assert "no policies given" in proc.stderr
    assert "policies.files" in proc.stderr and "policies.existingConfigMap" in proc.stderr


@needs_helm
def test_render_fails_clearly_without_database_secret(tmp_path):
    values = copy.deepcopy(SAMPLE_VALUES)
    del values["database"]
    proc = run_helm(["template", RELEASE, str(CHART)], values, tmp_path)
    assert proc.returncode != 0
    assert "database.existingSecret is required" in proc.stderr


@needs_helm
def test_render_rejects_both_policy_sources(tmp_path):
    values = with_values(policies={"existingConfigMap": "my-policies"})
    proc = run_helm(["template", RELEASE, str(CHART)], values, tmp_path)
    assert proc.returncode != 0
    assert "mutually exclusive" in proc.stderr
