"""Tests for the Helm chart in helm/euroute.

Helm's own engine renders and lints the chart (`helm-python-sdk` bundles it: no helm binary),
every manifest is validated against the Kubernetes API schemas of a pinned version
(`kubernetes-validate`, strict: unknown fields fail), and the policy files a release would
mount pass `euroute policy check`.
"""

from __future__ import annotations

import copy
import json
import os
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import helm_python
import jsonschema
import kubernetes_validate
import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
CHART = ROOT / "helm" / "euroute"
RELEASE = "euroute-test"
NAMESPACE = "euroute"
POLICY_DIR = "/etc/euroute/policies"
# The oldest Kubernetes that Chart.yaml's kubeVersion admits: what renders must be valid there
# (test_kubernetes_version_is_the_charts_floor keeps the two together).
KUBERNETES = "1.25.0"

helm_python.disable_logging()  # Helm logs each `fail` it evaluates; the tests read the error


def load_yaml(path: Path) -> Any:
    return yaml.safe_load(path.read_text(encoding="utf-8"))


def values_file(path: Path) -> dict[str, Any]:
    """A values file parsed by Helm itself, as `helm install -f` reads it."""
    return helm_python.values_from_yaml(path.read_text(encoding="utf-8"))


def deep_merge(base: dict, override: dict) -> dict:
    out = copy.deepcopy(base)
    for key, value in override.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = deep_merge(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


SAMPLE_VALUES: dict[str, Any] = values_file(CHART / "ci" / "test-values.yaml")
SAMPLE_POLICIES: dict[str, str] = SAMPLE_VALUES["policies"]["files"]
ONLY_DATABASE = {"database": {"existingSecret": "euroute-db"}}
# Every values file the chart ships, and the defaults with only the required value.
SHIPPED = {"defaults": ONLY_DATABASE} | {
    path.relative_to(CHART).as_posix(): values_file(path)
    for path in sorted([*CHART.glob("ci/*.yaml"), *CHART.glob("examples/*.yaml")])}


def with_values(**overrides: Any) -> dict:
    return deep_merge(SAMPLE_VALUES, overrides)


# --------------------------------------------------------------------------
# Static checks
# --------------------------------------------------------------------------


def plain_yaml_files() -> list[Path]:
    files = sorted(p for p in CHART.rglob("*") if p.suffix in (".yaml", ".yml"))
    return [p for p in files if "{{" not in p.read_text(encoding="utf-8")]


def test_plain_yaml_files_parse():
    files = plain_yaml_files()
    names = {p.relative_to(CHART).as_posix() for p in files}
    assert {"Chart.yaml", "values.yaml", "ci/test-values.yaml", "examples/production.yaml"} <= names
    for path in files:
        assert load_yaml(path) is not None, f"{path} is empty"


def test_chart_metadata():
    chart = load_yaml(CHART / "Chart.yaml")
    assert chart["apiVersion"] == "v2"
    assert chart["name"] == "euroute"
    assert chart["version"] == "0.1.0"
    assert chart["appVersion"] == "0.1.0"  # a string, not a float
    assert chart.get("type", "application") == "application"


def test_kubernetes_version_is_the_charts_floor():
    floor = re.fullmatch(r">=(\d+\.\d+\.\d+)-0", load_yaml(CHART / "Chart.yaml")["kubeVersion"])
    assert floor and floor.group(1) == KUBERNETES


def test_app_version_is_the_package_version():
    """The default image tag is appVersion, and the Dockerfile tags what it builds with the
    package version: the two must name the same release."""
    project = (ROOT / "pyproject.toml").read_text(encoding="utf-8")
    version = re.search(r'^version = "([^"]+)"', project, re.M).group(1)
    assert load_yaml(CHART / "Chart.yaml")["appVersion"] == version


def test_chart_ships_the_projects_own_policies():
    shipped = {p.name: p.read_bytes() for p in (CHART / "files" / "policies").glob("*.yaml")}
    own = {p.name: p.read_bytes() for p in (ROOT / "policies").glob("*.yaml")}
    assert shipped == own, ("helm/euroute/files/policies/ differs from policies/: "
                            "cp policies/*.yaml helm/euroute/files/policies/")


def test_values_defaults():
    values = load_yaml(CHART / "values.yaml")
    assert values["image"]["repository"] == "euroute"  # what the Dockerfile builds
    assert values["image"]["tag"] == ""  # defaults to the chart appVersion
    assert values["replicaCount"] == 2
    assert values["database"] == {"existingSecret": "", "secretKey": "database-url", "port": 5432}
    assert values["redis"] == {"existingSecret": "", "secretKey": "redis-url", "keyPrefix": "",
                               "port": 6379}
    assert values["mistral"]["secretKey"] == "api-key"
    assert values["pseudonym"]["secretKey"] == "pseudonym-key"
    assert values["policies"]["files"] == {}
    assert values["policies"]["existingConfigMap"] == ""
    assert values["policies"]["restartOnChange"] is False
    assert values["purge"]["enabled"] is True
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
    schema = json.loads((CHART / "values.schema.json").read_text(encoding="utf-8"))
    jsonschema.Draft7Validator.check_schema(schema)
    return jsonschema.Draft7Validator(schema)


def _errors(validator, values: dict) -> list[str]:
    return [e.message for e in validator.iter_errors(values)]


def test_values_yaml_matches_schema(validator):
    values = load_yaml(CHART / "values.yaml")
    assert _errors(validator, values) == []


@pytest.mark.parametrize("name", SHIPPED)
def test_shipped_values_match_schema(validator, name):
    defaults = load_yaml(CHART / "values.yaml")
    assert _errors(validator, deep_merge(defaults, SHIPPED[name])) == []


@pytest.mark.parametrize(
    "override",
    [
        {"replicaCount": "two"},
        {"replicaCount": -1},
        {"image": {"pullPolicy": "Sometimes"}},
        {"image": {"repository": ""}},
        {"database": {"existingSecret": "Not_A_Valid_Name"}},
        {"database": {"secretKey": ""}},
        {"redis": {"existingSecret": "Not_A_Valid_Name"}},
        {"redis": {"url": "redis://x"}},  # never a URL in plain values
        {"policies": {"files": {"../evil.yaml": "x: 1"}}},
        {"policies": {"files": {"routes.yaml": 42}}},
        {"policies": {"restartOnChange": "yes"}},
        {"purge": {"enabled": "daily"}},
        {"purge": {"schedule": "daily"}},
        {"purge": {"schedule": "0 3 * *"}},
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
# Rendering checks: Helm's engine, Kubernetes' schemas, euroute's policy check
# --------------------------------------------------------------------------


@pytest.fixture(scope="module")
def chart():
    with helm_python.Chart.load(CHART) as loaded:
        yield loaded


def render(chart: helm_python.Chart, values: dict) -> list[dict]:
    manifests = chart.render(values, name=RELEASE, namespace=NAMESPACE)
    return [doc for path, text in sorted(manifests.items()) if path.endswith(".yaml")
            for doc in yaml.safe_load_all(text) if doc]


def render_error(chart: helm_python.Chart, values: dict) -> str:
    with pytest.raises(helm_python.HelmError) as failed:
        chart.render(values, name=RELEASE, namespace=NAMESPACE)
    return str(failed.value)


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


# The ServiceMonitor is a Prometheus Operator CRD that no Kubernetes release defines: this is
# the part of monitoring.coreos.com/v1 the chart writes, closed like the strict built-in schemas.
_CLOSED = {"type": "object", "additionalProperties": False}
SERVICE_MONITOR = {
    **_CLOSED, "required": ["apiVersion", "kind", "metadata", "spec"],
    "properties": {
        "apiVersion": {"const": "monitoring.coreos.com/v1"}, "kind": {"const": "ServiceMonitor"},
        "metadata": {**_CLOSED, "required": ["name"], "properties": {
            "name": {"type": "string"}, "namespace": {"type": "string"},
            "labels": {"type": "object", "additionalProperties": {"type": "string"}}}},
        "spec": {**_CLOSED, "required": ["selector", "endpoints"], "properties": {
            "namespaceSelector": {**_CLOSED, "properties": {
                "any": {"type": "boolean"},
                "matchNames": {"type": "array", "items": {"type": "string"}}}},
            "selector": {**_CLOSED, "properties": {"matchLabels": {
                "type": "object", "additionalProperties": {"type": "string"}}}},
            "endpoints": {"type": "array", "minItems": 1, "items": {**_CLOSED, "properties": {
                "port": {"type": "string"}, "path": {"type": "string", "pattern": "^/"},
                "scheme": {"enum": ["http", "https"]},
                "interval": {"type": "string", "pattern": "^(0|(([0-9]+)(ms|s|m|h))+)$"},
                "scrapeTimeout": {"type": "string", "pattern": "^(0|(([0-9]+)(ms|s|m|h))+)$"},
                "relabelings": {"type": "array", "items": {"type": "object"}},
                "metricRelabelings": {"type": "array", "items": {"type": "object"}}}}}}},
    },
}


def validate_manifest(doc: dict) -> None:
    if doc["kind"] == "ServiceMonitor":
        jsonschema.validate(doc, SERVICE_MONITOR)
    else:
        kubernetes_validate.validate(doc, KUBERNETES, strict=True)


@pytest.mark.parametrize("name", SHIPPED)
def test_shipped_values_lint_clean(name):
    report = helm_python.lint(CHART, SHIPPED[name], strict=True, namespace=NAMESPACE,
                              kube_version=f"v{KUBERNETES}")
    assert report["errors"] == []
    # Severity 2 is a warning, 3 an error; 1 (info) is only "icon is recommended".
    assert [m for m in report["messages"] if m["severity"] >= 2] == []


@pytest.mark.parametrize("name", SHIPPED)
def test_shipped_values_render_valid_kubernetes(chart, name):
    docs = render(chart, SHIPPED[name])
    assert {"Deployment", "Service", "ConfigMap", "Job", "CronJob"} <= {d["kind"] for d in docs}
    for doc in docs:
        validate_manifest(doc)


def test_validation_is_strict(chart):
    """An unknown field fails: what the schemas accept is what the API server takes."""
    deployment = one(render(chart, ONLY_DATABASE), "Deployment")
    deployment["spec"]["template"]["spec"]["containers"][0]["resource"] = {}
    with pytest.raises(kubernetes_validate.ValidationError):
        validate_manifest(deployment)
    monitor = one(render(chart, SHIPPED["examples/production.yaml"]), "ServiceMonitor")
    monitor["spec"]["endpoints"][0]["intervall"] = "30s"
    with pytest.raises(jsonschema.ValidationError):
        validate_manifest(monitor)


def policy_check(directory: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "EUROUTE_POLICY_DIR": str(directory)}
    return subprocess.run([sys.executable, "-m", "proxy", "policy", "check"], env=env, cwd=ROOT,
                          capture_output=True, text=True, timeout=60, check=False)


@pytest.mark.parametrize("name", SHIPPED)
def test_shipped_values_mount_policies_that_pass_the_check(chart, name, tmp_path):
    configmap = one(render(chart, SHIPPED[name]), "ConfigMap")
    for file, content in configmap["data"].items():
        (tmp_path / file).write_text(content, encoding="utf-8")
    checked = policy_check(tmp_path)
    assert checked.returncode == 0, checked.stdout + checked.stderr
    assert f"{tmp_path}: OK" in checked.stdout


def test_policy_check_of_a_rendered_configmap_can_fail(chart, tmp_path):
    """The check above would catch the old schema the ci values once held."""
    old = with_values(policies={"files": {"apps.yaml": "apps:\n  example-app: eu-strict\n"}})
    for file, content in one(render(chart, old), "ConfigMap")["data"].items():
        (tmp_path / file).write_text(content, encoding="utf-8")
    checked = policy_check(tmp_path)
    assert checked.returncode == 1 and "problem" in checked.stderr


def test_defaults_serve_the_projects_own_policies(chart):
    docs = render(chart, ONLY_DATABASE)
    configmap = one(docs, "ConfigMap")
    own = {p.name: p.read_text(encoding="utf-8") for p in (ROOT / "policies").glob("*.yaml")}
    assert configmap["data"] == own
    pod = one(docs, "Deployment")["spec"]["template"]["spec"]
    volume = next(v for v in pod["volumes"] if v["name"] == "policies")
    assert volume["configMap"]["name"] == configmap["metadata"]["name"]
    assert server_container(docs)["image"] == "euroute:0.1.0"


@pytest.fixture(scope="module")
def docs(chart):
    return render(chart, SAMPLE_VALUES)


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


def test_purge_cronjob_runs_with_the_servers_security_context(docs):
    cronjob = one(docs, "CronJob")
    assert cronjob["spec"]["schedule"] == "17 3 * * *"
    assert cronjob["spec"]["concurrencyPolicy"] == "Forbid"
    pod = cronjob["spec"]["jobTemplate"]["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    assert [*container["command"], *container["args"]] == ["euroute", "purge"]
    assert env_map(container)["EUROUTE_DATABASE_URL"]["valueFrom"]["secretKeyRef"] == {
        "name": "euroute-db", "key": "database-url"}
    server_pod = one(docs, "Deployment")["spec"]["template"]["spec"]
    assert pod["securityContext"] == server_pod["securityContext"]
    assert container["securityContext"] == server_container(docs)["securityContext"]
    assert container["image"] == server_container(docs)["image"]
    assert pod["automountServiceAccountToken"] is False
    tmp_mount = next(m for m in container["volumeMounts"] if m["mountPath"] == "/tmp")
    assert "emptyDir" in next(v for v in pod["volumes"] if v["name"] == tmp_mount["name"])


def test_purge_schedule_and_switch(chart):
    docs = render(chart, with_values(purge={"schedule": "0 2 * * 0", "timeZone": "Europe/Paris"}))
    cronjob = one(docs, "CronJob")
    assert (cronjob["spec"]["schedule"], cronjob["spec"]["timeZone"]) == ("0 2 * * 0",
                                                                          "Europe/Paris")
    assert not by_kind(render(chart, with_values(purge={"enabled": False})), "CronJob")


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


def test_redis_url_comes_from_a_secret(docs, chart):
    env = env_map(server_container(docs))
    assert env["EUROUTE_REDIS_URL"] == {"name": "EUROUTE_REDIS_URL", "valueFrom": {
        "secretKeyRef": {"name": "euroute-redis", "key": "redis-url"}}}
    assert env["EUROUTE_REDIS_PREFIX"]["value"] == f"{NAMESPACE}/{RELEASE}:"
    own_prefix = render(chart, with_values(redis={"keyPrefix": "team-a:"}))
    assert env_map(server_container(own_prefix))["EUROUTE_REDIS_PREFIX"]["value"] == "team-a:"
    without = render(chart, ONLY_DATABASE)
    assert not {"EUROUTE_REDIS_URL", "EUROUTE_REDIS_PREFIX"} & set(env_map(server_container(without)))


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


def test_probes(docs):
    container = server_container(docs)
    assert container["livenessProbe"]["httpGet"]["path"] == "/healthz"
    assert container["readinessProbe"]["httpGet"]["path"] == "/readyz"
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    assert ports == {"http": 8080}
    for probe in ("livenessProbe", "readinessProbe"):
        assert container[probe]["httpGet"]["port"] in ("http", 8080)


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


def test_service_and_pdb_select_only_server_pods(docs):
    deployment = one(docs, "Deployment")
    assert deployment["spec"]["replicas"] == 2
    pod_labels = deployment["spec"]["template"]["metadata"]["labels"]
    other_pods = [one(docs, "Job")["spec"]["template"]["metadata"]["labels"],
                  one(docs, "CronJob")["spec"]["jobTemplate"]["spec"]["template"]["metadata"]["labels"]]
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
        for labels in other_pods:
            assert not selector.items() <= labels.items()


def test_optional_resources_are_off_by_default(docs):
    kinds = {d["kind"] for d in docs}
    assert not kinds & {"Ingress", "HorizontalPodAutoscaler", "NetworkPolicy", "ServiceMonitor"}


def test_production_example(chart):
    docs = render(chart, SHIPPED["examples/production.yaml"])
    deployment = one(docs, "Deployment")
    hpa = one(docs, "HorizontalPodAutoscaler")
    assert hpa["spec"]["minReplicas"] == 3 and "replicas" not in deployment["spec"]
    assert one(docs, "PodDisruptionBudget")["spec"]["minAvailable"] == 2
    assert server_container(docs)["resources"]["requests"] == {"cpu": "500m", "memory": "512Mi"}
    env = env_map(server_container(docs))
    assert env["EUROUTE_REDIS_URL"]["valueFrom"]["secretKeyRef"]["name"] == "euroute-redis"
    netpol = one(docs, "NetworkPolicy")
    egress = {p["port"] for rule in netpol["spec"]["egress"] for p in rule["ports"]}
    assert egress == {53, 5432, 6379, 443}
    assert all(rule.get("to") for rule in netpol["spec"]["egress"])  # each rule names its peers
    assert one(docs, "ServiceMonitor")["spec"]["endpoints"][0]["path"] == "/metrics"


def test_optional_resources_render(chart):
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
    docs = render(chart, values)
    for doc in docs:
        validate_manifest(doc)
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
    assert egress_ports == {(53, "UDP"), (53, "TCP"), (5432, "TCP"), (6379, "TCP"), (443, "TCP")}
    monitor = one(docs, "ServiceMonitor")
    (endpoint,) = monitor["spec"]["endpoints"]
    assert endpoint["path"] == "/metrics" and endpoint["port"] == "http"
    env = env_map(server_container(docs))
    assert env["MISTRAL_BASE_URL"]["value"] == "https://mistral.internal.example/v1"
    (constraint,) = deployment["spec"]["template"]["spec"]["topologySpreadConstraints"]
    assert constraint["labelSelector"]["matchLabels"] == deployment["spec"]["selector"]["matchLabels"]
    no_redis = render(chart, deep_merge(ONLY_DATABASE, {"networkPolicy": {"enabled": True}}))
    ports = {p["port"] for rule in one(no_redis, "NetworkPolicy")["spec"]["egress"] for p in rule["ports"]}
    assert 6379 not in ports


def test_existing_configmap(chart):
    values = copy.deepcopy(SAMPLE_VALUES)
    values["policies"] = {"existingConfigMap": "my-policies", "restartOnChange": True}
    docs = render(chart, values)
    assert not by_kind(docs, "ConfigMap")
    pod = one(docs, "Deployment")["spec"]["template"]
    assert {"name": "my-policies"} in [v.get("configMap") for v in pod["spec"]["volumes"]]
    assert "checksum/policies" not in pod["metadata"].get("annotations", {})


def test_restart_on_change_adds_policy_checksum(chart):
    def checksum(files: dict) -> str:
        values = copy.deepcopy(SAMPLE_VALUES)
        values["policies"] = {"files": files, "restartOnChange": True}
        docs = render(chart, values)
        return one(docs, "Deployment")["spec"]["template"]["metadata"]["annotations"]["checksum/policies"]

    first = checksum(SAMPLE_POLICIES)
    assert first == checksum(SAMPLE_POLICIES)
    assert first != checksum({**SAMPLE_POLICIES, "apps.yaml": "apps:\n  other-app: eu-limited\n"})
    assert first != checksum({})  # the shipped policies


def test_render_fails_clearly_without_database_secret(chart):
    values = copy.deepcopy(SAMPLE_VALUES)
    del values["database"]
    assert "database.existingSecret is required" in render_error(chart, values)


def test_render_rejects_both_policy_sources(chart):
    values = with_values(policies={"existingConfigMap": "my-policies"})
    assert "mutually exclusive" in render_error(chart, values)


def test_render_rejects_values_outside_the_schema(chart):
    assert "replicas" in render_error(chart, deep_merge(ONLY_DATABASE, {"replicas": 3}))


def test_notes_say_whether_rate_limits_are_shared(chart):
    def notes(values: dict) -> str:
        return chart.render(values, name=RELEASE, namespace=NAMESPACE)["euroute/templates/NOTES.txt"]

    assert "limits hold per replica" in notes(ONLY_DATABASE)
    shared = notes(SAMPLE_VALUES)
    assert "shared by all replicas through Redis" in shared and "per replica" not in shared
    assert f'CronJob "{RELEASE}-purge"' in shared
