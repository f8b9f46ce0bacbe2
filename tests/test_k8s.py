"""Deployment artifacts, checked offline: every kustomize overlay under k8s/overlays renders with
`kubectl kustomize`, each rendered object validates against the Kubernetes JSON schemas (kubernetes-validate,
which ships them; strict: unknown fields fail), checkov reports no failed check on the Dockerfile and the
rendered manifests, and the manifests agree with the server, the CLI and the Dockerfile (ports, user, probes,
drain timing, IMGCLS_* settings, command-line flags). The container itself is proven by
scripts/container_test.sh (make container-test).

Needs kubectl (Debian/Google's `kubectl` package; tests skip with a message without it) and the `deploy`
extra (kubernetes-validate, checkov, PyYAML).
"""

from __future__ import annotations

import copy
import json
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
OVERLAYS = sorted(p.parent for p in (ROOT / "k8s" / "overlays").glob("*/kustomization.yaml"))
# Oldest Kubernetes the manifests target (native gRPC probes: 1.27 GA; preStop `sleep`: beta, on by default,
# since 1.30) and the newest schemas kubernetes-validate ships.
K8S_VERSIONS = ("1.30.0", "latest")
SERVER_UID = 10001
POD_KINDS = ("Deployment", "Job", "CronJob")

yaml = pytest.importorskip("yaml", reason="PyYAML missing: pip install -e '.[deploy]'")

# The Prometheus Operator's CRD is not among the Kubernetes schemas: the fields these manifests use, from
# monitoring.coreos.com/v1 ServiceMonitor, with unknown fields rejected like kubernetes-validate's strict mode.
DURATION = r"^(0|(([0-9]+)y)?(([0-9]+)w)?(([0-9]+)d)?(([0-9]+)h)?(([0-9]+)m)?(([0-9]+)s)?(([0-9]+)ms)?)$"
LABEL_SELECTOR = {
    "type": "object", "additionalProperties": False,
    "properties": {
        "matchLabels": {"type": "object", "additionalProperties": {"type": "string"}},
        "matchExpressions": {"type": "array", "items": {
            "type": "object", "required": ["key", "operator"], "additionalProperties": False,
            "properties": {"key": {"type": "string"}, "operator": {"type": "string"},
                           "values": {"type": "array", "items": {"type": "string"}}}}},
    },
}
SERVICE_MONITOR_SCHEMA = {
    "type": "object", "required": ["apiVersion", "kind", "metadata", "spec"], "additionalProperties": False,
    "properties": {
        "apiVersion": {"const": "monitoring.coreos.com/v1"},
        "kind": {"const": "ServiceMonitor"},
        "metadata": {"type": "object", "required": ["name"], "properties": {
            "name": {"type": "string"}, "namespace": {"type": "string"},
            "labels": {"type": "object", "additionalProperties": {"type": "string"}},
            "annotations": {"type": "object", "additionalProperties": {"type": "string"}}}},
        "spec": {
            "type": "object", "required": ["selector", "endpoints"], "additionalProperties": False,
            "properties": {
                "selector": LABEL_SELECTOR,
                "namespaceSelector": {"type": "object", "additionalProperties": False, "properties": {
                    "any": {"type": "boolean"}, "matchNames": {"type": "array", "items": {"type": "string"}}}},
                "jobLabel": {"type": "string"},
                "endpoints": {"type": "array", "minItems": 1, "items": {
                    "type": "object", "additionalProperties": False,
                    "properties": {
                        "port": {"type": "string"}, "targetPort": {"type": ["string", "integer"]},
                        "path": {"type": "string", "pattern": "^/"},
                        "scheme": {"enum": ["http", "https"]},
                        "interval": {"type": "string", "pattern": DURATION},
                        "scrapeTimeout": {"type": "string", "pattern": DURATION},
                        "honorLabels": {"type": "boolean"},
                    }}},
            },
        },
    },
}


# --- rendering ---------------------------------------------------------------------------------------------

def kubectl() -> str:
    path = shutil.which("kubectl")
    if path is None:
        pytest.skip("kubectl not installed (it renders the kustomize overlays): apt-get install kubectl, or any "
                    "kubectl >= 1.27 on PATH")
    return path


def render(overlay: Path) -> list[dict]:
    proc = subprocess.run([kubectl(), "kustomize", str(overlay)], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, f"kubectl kustomize {overlay.relative_to(ROOT)} failed:\n{proc.stderr}"
    return [doc for doc in yaml.safe_load_all(proc.stdout) if doc]


@pytest.fixture(scope="module")
def rendered() -> dict[str, list[dict]]:
    assert OVERLAYS, "no overlay under k8s/overlays"
    return {overlay.name: render(overlay) for overlay in OVERLAYS}


def objects(docs: list[dict], kind: str) -> list[dict]:
    return [d for d in docs if d["kind"] == kind]


def one(docs: list[dict], kind: str, name: str | None = None) -> dict:
    found = [d for d in objects(docs, kind) if name is None or d["metadata"]["name"] == name]
    assert len(found) == 1, f"expected one {kind} {name or ''}, found {len(found)}"
    return found[0]


def pod_spec(obj: dict) -> dict:
    if obj["kind"] == "CronJob":
        return obj["spec"]["jobTemplate"]["spec"]["template"]["spec"]
    return obj["spec"]["template"]["spec"]


def pod_labels(obj: dict) -> dict:
    template = obj["spec"]["jobTemplate"]["spec"]["template"] if obj["kind"] == "CronJob" else obj["spec"]["template"]
    return template["metadata"]["labels"]


def containers(obj: dict) -> list[dict]:
    spec = pod_spec(obj)
    return spec.get("initContainers", []) + spec["containers"]


def server_env(docs: list[dict]) -> dict[str, str]:
    """The server's environment from its ConfigMap (kustomize adds a hash to the generated name)."""
    deployment = one(docs, "Deployment", "imgcls")
    (ref,) = [e["configMapRef"]["name"] for e in pod_spec(deployment)["containers"][0]["envFrom"]]
    return one(docs, "ConfigMap", ref)["data"]


def selects(selector: dict, labels: dict) -> bool:
    return selector.items() <= labels.items()


def test_overlays_exist():
    assert {"dev", "prod"} <= {o.name for o in OVERLAYS}


@pytest.mark.parametrize("overlay", [o.name for o in OVERLAYS])
def test_overlay_renders_everything(rendered, overlay):
    docs = rendered[overlay]
    kinds = {d["kind"] for d in docs}
    assert {"Namespace", "ServiceAccount", "ConfigMap", "Deployment", "Service", "HorizontalPodAutoscaler",
            "PodDisruptionBudget", "NetworkPolicy", "ServiceMonitor", "Job", "CronJob",
            "PersistentVolumeClaim"} <= kinds
    (namespace,) = objects(docs, "Namespace")
    for doc in docs:
        if doc["kind"] != "Namespace":
            assert doc["metadata"].get("namespace") == namespace["metadata"]["name"], doc["metadata"]
    assert namespace["metadata"]["labels"]["pod-security.kubernetes.io/enforce"] == "restricted"


# --- schemas -----------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def kv():
    return pytest.importorskip("kubernetes_validate", reason="kubernetes-validate missing: pip install -e '.[deploy]'")


def validate(kv, doc: dict, version: str) -> None:
    if version == "latest":
        version = kv.utils.latest_version()
    if doc["apiVersion"] == "monitoring.coreos.com/v1":
        import jsonschema

        jsonschema.validate(doc, SERVICE_MONITOR_SCHEMA)
    else:
        kv.validate(doc, version, strict=True)  # raises SchemaNotFoundError for a kind it does not know


@pytest.mark.parametrize("version", K8S_VERSIONS)
@pytest.mark.parametrize("overlay", [o.name for o in OVERLAYS])
def test_rendered_objects_validate_against_schemas(rendered, kv, overlay, version):
    for doc in rendered[overlay]:
        try:
            validate(kv, doc, version)
        except kv.utils.ValidationError as exc:
            path = ".".join(str(p) for p in exc.path)
            pytest.fail(f"{overlay}: {doc['kind']}/{doc['metadata']['name']} invalid for Kubernetes {version}: "
                        f"{path}: {exc.message}")


def test_schema_validation_is_not_vacuous(rendered, kv):
    """A typo in a field name, a wrong type, a bad enum value and a bad ServiceMonitor all fail."""
    import jsonschema

    docs = rendered["prod"]
    deployment = one(docs, "Deployment", "imgcls")
    broken = []
    typo = copy.deepcopy(deployment)
    pod_spec(typo)["containers"][0]["readinessProbe"]["grpc"]["sevice"] = "x"
    broken.append(typo)
    wrong_type = copy.deepcopy(deployment)
    pod_spec(wrong_type)["containers"][0]["livenessProbe"]["grpc"]["port"] = "grpc"  # gRPC probes take a number
    broken.append(wrong_type)
    bad_hpa = copy.deepcopy(one(docs, "HorizontalPodAutoscaler"))
    bad_hpa["spec"]["metrics"][0]["resource"]["target"]["averageUtilization"] = "70%"
    broken.append(bad_hpa)
    for doc in broken:
        with pytest.raises(kv.utils.ValidationError):
            validate(kv, doc, "latest")
    monitor = copy.deepcopy(one(docs, "ServiceMonitor"))
    monitor["spec"]["endpoints"][0]["interval"] = "15 seconds"
    with pytest.raises(jsonschema.ValidationError):
        validate(kv, monitor, "latest")


# --- the manifests agree with the server, the CLI and the image --------------------------------------------

def serve_flags() -> dict[str, str]:
    """IMGCLS_* variable -> `imgcls serve` flag, from the real CLI parser."""
    from imgcls.cli import build_parser

    parser = build_parser()
    sub = next(a for a in parser._actions if a.__class__.__name__ == "_SubParsersAction")
    serve = sub.choices["serve"]
    return {"IMGCLS_" + opt.lstrip("-").upper().replace("-", "_"): opt
            for action in serve._actions for opt in action.option_strings if opt.startswith("--")}


def parse_cli(argv: list[str]):
    from imgcls.cli import build_parser

    try:
        return build_parser().parse_args(argv)
    except SystemExit as exc:
        pytest.fail(f"`imgcls {shlex.join(argv)}` does not parse (exit {exc.code})")


@pytest.mark.parametrize("overlay", [o.name for o in OVERLAYS])
def test_configmap_settings_are_real_serve_flags(rendered, overlay):
    flags = serve_flags()
    env = server_env(rendered[overlay])
    unknown = sorted(set(env) - set(flags))
    assert not unknown, f"ConfigMap keys that `imgcls serve` does not read: {unknown}"
    deployment = one(rendered[overlay], "Deployment", "imgcls")
    for var in pod_spec(deployment)["containers"][0].get("env", []):
        assert var["name"] in flags, var["name"]


@pytest.mark.parametrize("overlay", [o.name for o in OVERLAYS])
def test_server_deployment(rendered, overlay):
    docs = rendered[overlay]
    env = server_env(docs)
    deployment = one(docs, "Deployment", "imgcls")
    assert "replicas" not in deployment["spec"], "the HPA owns the replica count"
    spec = pod_spec(deployment)
    (container,) = spec["containers"]
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    assert ports == {"grpc": int(env["IMGCLS_PORT"]), "metrics": int(env["IMGCLS_METRICS_PORT"]),
                     "http": int(env["IMGCLS_HTTP_PORT"])}
    assert env["IMGCLS_MODEL_REPOSITORY"] == "/models"
    assert {"mountPath": "/models", "name": "models", "readOnly": True} in container["volumeMounts"]

    # Native gRPC probes on the health service: readiness on the inference service, startup long enough
    # to load and warm up models.
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        assert container[probe]["grpc"]["port"] == ports["grpc"], probe
    assert container["readinessProbe"]["grpc"]["service"] == "imgcls.v1.Inference"
    startup = container["startupProbe"]
    assert startup["periodSeconds"] * startup["failureThreshold"] >= 120

    # Drain: preStop sleep, then SIGTERM and IMGCLS_GRACE_PERIOD for calls in flight, all within the
    # termination grace period; liveness must not restart a draining pod.
    grace = float(env["IMGCLS_GRACE_PERIOD"])
    pre_stop = container["lifecycle"]["preStop"]["sleep"]["seconds"]
    assert spec["terminationGracePeriodSeconds"] >= pre_stop + grace + 5
    live = container["livenessProbe"]
    assert live["periodSeconds"] * live["failureThreshold"] > grace

    # Workers and threads follow the CPU limit, not the node; no explicit thread count that every worker
    # would take in full.
    sized = {v["name"]: v["valueFrom"]["resourceFieldRef"] for v in container["env"]}
    assert sized["IMGCLS_CPUS"]["resource"] == "limits.cpu"
    assert not {"IMGCLS_INFERENCE_THREADS", "IMGCLS_DECODE_WORKERS"} & (set(sized) | set(env))
    assert {"cpu", "memory"} <= container["resources"]["requests"].keys() & container["resources"]["limits"].keys()


@pytest.mark.parametrize("overlay", [o.name for o in OVERLAYS])
def test_pods_are_locked_down(rendered, overlay):
    for obj in (o for o in rendered[overlay] if o["kind"] in POD_KINDS):
        where = f"{overlay} {obj['kind']}/{obj['metadata']['name']}"
        spec = pod_spec(obj)
        pod_sc = spec["securityContext"]
        assert pod_sc["runAsNonRoot"] is True and pod_sc["runAsUser"] == SERVER_UID, where
        assert pod_sc["seccompProfile"]["type"] == "RuntimeDefault", where
        assert spec["automountServiceAccountToken"] is False, where
        assert spec["enableServiceLinks"] is False, where  # IMGCLS_PORT=tcp://... from the Service otherwise
        writable_volumes = set()
        for volume in spec["volumes"]:
            if "emptyDir" in volume:
                assert "sizeLimit" in volume["emptyDir"], f"{where}: emptyDir {volume['name']} without sizeLimit"
            writable_volumes.add(volume["name"])
        for container in containers(obj):
            sc = container["securityContext"]
            assert sc["readOnlyRootFilesystem"] is True, where
            assert sc["allowPrivilegeEscalation"] is False, where
            assert sc["capabilities"]["drop"] == ["ALL"] and "add" not in sc["capabilities"], where
            assert "resources" in container and "limits" in container["resources"], where
            for mount in container.get("volumeMounts", []):
                assert mount["name"] in writable_volumes, where


@pytest.mark.parametrize("overlay", [o.name for o in OVERLAYS])
def test_services_policies_and_monitoring_select_the_right_pods(rendered, overlay):
    docs = rendered[overlay]
    deployment = one(docs, "Deployment", "imgcls")
    server = pod_labels(deployment)
    service = one(docs, "Service", "imgcls")
    jobs = [o for o in docs if o["kind"] in ("Job", "CronJob")]
    assert selects(service["spec"]["selector"], server)
    assert selects(deployment["spec"]["selector"]["matchLabels"], server)
    for job in jobs:  # Job pods never join the Service or count against the Deployment
        assert not selects(service["spec"]["selector"], pod_labels(job)), job["metadata"]["name"]
    assert {p["name"]: p["port"] for p in service["spec"]["ports"]} == {
        p["name"]: p["containerPort"] for p in pod_spec(deployment)["containers"][0]["ports"]}

    monitor = one(docs, "ServiceMonitor")
    assert selects(monitor["spec"]["selector"]["matchLabels"], service["metadata"]["labels"])
    assert {e["port"] for e in monitor["spec"]["endpoints"]} <= {p["name"] for p in service["spec"]["ports"]}

    pdb = one(docs, "PodDisruptionBudget")
    assert selects(pdb["spec"]["selector"]["matchLabels"], server)
    hpa = one(docs, "HorizontalPodAutoscaler")
    assert hpa["spec"]["scaleTargetRef"] == {"apiVersion": "apps/v1", "kind": "Deployment", "name": "imgcls"}
    assert any(m["type"] == "Resource" and m["resource"]["name"] == "cpu" for m in hpa["spec"]["metrics"])

    # Every pod has a NetworkPolicy; the server's admits gRPC from the batch Job's pods.
    policies = objects(docs, "NetworkPolicy")
    for obj in [deployment, *jobs]:
        assert any(selects(p["spec"]["podSelector"]["matchLabels"], pod_labels(obj)) for p in policies), \
            obj["metadata"]["name"]
    server_policy = next(p for p in policies if selects(p["spec"]["podSelector"]["matchLabels"], server))
    assert server_policy["spec"]["egress"] == []
    batch = one(docs, "Job", "imgcls-batch")
    grpc_rule = next(r for r in server_policy["spec"]["ingress"] if {"port": "grpc", "protocol": "TCP"} in r["ports"])
    assert any(selects(peer["podSelector"]["matchLabels"], pod_labels(batch)) for peer in grpc_rule["from"])
    assert {"port": "http", "protocol": "TCP"} in grpc_rule["ports"]  # HTTP clients are admitted like gRPC ones


def test_queue_time_autoscaling_variant(rendered):
    hpa = one(rendered["prod-queue-hpa"], "HorizontalPodAutoscaler")
    kinds = {m["type"]: m for m in hpa["spec"]["metrics"]}
    assert kinds.keys() == {"Resource", "Pods"}
    assert kinds["Pods"]["pods"]["metric"]["name"] == "imgcls_queue_wait_seconds_avg"
    rules = yaml.safe_load((ROOT / "k8s/components/queue-time-hpa/prometheus-adapter-rules.yaml").read_text())
    (rule,) = rules["rules"]["custom"]
    assert rule["name"]["as"] == "imgcls_queue_wait_seconds_avg"
    from imgcls.service.metrics import Metrics

    histogram = Metrics().queue_wait._name  # the real metric the adapter rule reads
    assert f"{histogram}_sum" in rule["metricsQuery"] and f"{histogram}_count" in rule["seriesQuery"]


@pytest.mark.parametrize("overlay", [o.name for o in OVERLAYS])
def test_jobs_run_real_commands(rendered, overlay):
    docs = rendered[overlay]
    service = one(docs, "Service", "imgcls")
    grpc_port = next(p["port"] for p in service["spec"]["ports"] if p["name"] == "grpc")

    batch = one(docs, "Job", "imgcls-batch")
    (container,) = pod_spec(batch)["containers"]
    assert container["command"] == ["imgcls", "batch"]
    args = parse_cli(["batch", *container["args"]])
    assert args.target == f"imgcls:{grpc_port}"
    mounts = {m["mountPath"] for m in container["volumeMounts"]}
    for path in (args.input, args.output):
        assert any(str(path).startswith(m + "/") for m in mounts), f"{path} is on no volume"

    cron = one(docs, "CronJob", "imgcls-train-export")
    train, export = containers(cron)
    assert train["name"] == "train" and export["name"] == "export"
    pytest.importorskip("imgcls.training.cli")
    train_args = parse_cli(train["args"])
    export_args = parse_cli(export["args"])
    assert train_args.command == "train" and export_args.command == "export"
    assert str(export_args.model) == str(train_args.out)  # the bundle the init container wrote
    models_mount = next(m for m in export["volumeMounts"] if m["name"] == "models")
    assert str(export_args.repository) == models_mount["mountPath"] and not models_mount.get("readOnly")
    volumes = {v["name"]: v for v in pod_spec(cron)["volumes"]}
    deployment = one(docs, "Deployment", "imgcls")
    served = {v["name"]: v for v in pod_spec(deployment)["volumes"]}["models"]
    assert volumes["models"]["persistentVolumeClaim"]["claimName"] == served["persistentVolumeClaim"]["claimName"]


def test_prod_pins_image_digests(rendered):
    for obj in (o for o in rendered["prod"] if o["kind"] in POD_KINDS):
        for container in containers(obj):
            assert re.search(r"@sha256:[0-9a-f]{64}$", container["image"]), container["image"]


# --- Dockerfile --------------------------------------------------------------------------------------------

def dockerfile_stages() -> dict[str, list[str]]:
    """Stage name -> its instructions (continuation lines joined, comments dropped)."""
    text = (ROOT / "Dockerfile").read_text()
    lines, current = [], ""
    for raw in text.splitlines():
        if raw.lstrip().startswith("#") or not raw.strip():
            continue
        current += raw.rstrip("\\").strip() + " "
        if not raw.rstrip().endswith("\\"):
            lines.append(current.strip())
            current = ""
    stages: dict[str, list[str]] = {}
    name = None
    for line in lines:
        match = re.match(r"FROM\s+(\S+)(?:\s+AS\s+(\S+))?", line, re.I)
        if match:
            name = match.group(2) or match.group(1)
            stages[name] = [line]
        elif name:
            stages[name].append(line)
    return stages


def stage_closure(stages: dict[str, list[str]], name: str) -> set[str]:
    """The stage, the stages it is built FROM and the stages it COPYs --from, transitively."""
    seen, todo = set(), [name]
    while todo:
        stage = todo.pop()
        if stage in seen or stage not in stages:
            continue
        seen.add(stage)
        for line in stages[stage]:
            todo += re.findall(r"^FROM\s+(\S+)", line, re.I) + re.findall(r"--from=(\S+)", line)
    return seen


def test_serving_image_installs_no_tensorflow():
    sys.path.insert(0, str(ROOT / "scripts"))
    try:
        from pyproject_requirements import requirements
    finally:
        sys.path.pop(0)
    stages = dockerfile_stages()
    assert stages[list(stages)[-1]][0].startswith("FROM runtime AS serve"), "the default target serves"
    closure = stage_closure(stages, "serve")
    assert "build-train" not in closure and "trainer" not in closure
    installs = [line for s in closure for line in stages[s] if "pip install" in line]
    assert len(installs) >= 2, "no dependency and project install steps in the serving stages"
    for line in installs:
        assert not re.search(r"tensorflow|tf[-_]keras|tf2onnx|\.\[", line), line  # no extras, no TF by name
        for extras in re.findall(r"pyproject_requirements\.py([^>;&|]*)", line):
            assert not extras.strip(), f"the serving image asks for extras {extras.strip()!r}: {line}"
    # What those steps install: the base dependencies, no extras.
    serving = requirements(ROOT / "pyproject.toml", [])
    assert not [r for r in serving if re.match(r"(tensorflow|tf-keras|tf2onnx|keras)\b", r)], serving
    assert any(r.startswith("onnxruntime") for r in serving) and any(r.startswith("ai-edge-litert") for r in serving)
    trainer = requirements(ROOT / "pyproject.toml", ["export"])  # `imgcls[train]` inside `export` is expanded
    assert any(r.startswith("tensorflow") for r in trainer) and any(r.startswith("tf2onnx") for r in trainer)


def test_dockerfile_matches_the_manifests(rendered):
    stages = dockerfile_stages()
    runtime = " \n".join(stages["runtime"] + stages["runtime-base"])
    assert f"USER {SERVER_UID}:{SERVER_UID}" in runtime
    assert 'ENTRYPOINT ["imgcls", "serve"]' in runtime
    exposed = {int(p) for line in stages["runtime"] if line.startswith("EXPOSE") for p in line.split()[1:]}
    env = server_env(rendered["prod"])
    assert exposed == {int(env["IMGCLS_PORT"]), int(env["IMGCLS_METRICS_PORT"]), int(env["IMGCLS_HTTP_PORT"])}
    assert "IMGCLS_MODEL_REPOSITORY=/models" in runtime
    assert not any("apt-get" in line for line in stages["runtime-base"] + stages["runtime"]), "no packages in runtime"
    assert "USER 10001:10001" in " ".join(stages["trainer"])
    # The proxy CA reaches pip as a build secret, never a layer.
    text = (ROOT / "Dockerfile").read_text()
    assert "--mount=type=secret,id=pip_ca" in text
    assert not re.search(r"^\s*(COPY|ADD)\b.*\.(crt|pem)\b", text, re.M | re.I)


# --- checkov -----------------------------------------------------------------------------------------------

@pytest.mark.slow
def test_checkov_passes_dockerfile_and_rendered_manifests(rendered, tmp_path):
    checkov = shutil.which("checkov") or shutil.which("checkov", path=str(Path(sys.executable).parent))
    if checkov is None:
        pytest.skip("checkov missing: pip install -e '.[deploy]'")
    shutil.copy(ROOT / "Dockerfile", tmp_path / "Dockerfile")
    for overlay, docs in rendered.items():
        (tmp_path / f"{overlay}.yaml").write_text(yaml.safe_dump_all(docs, sort_keys=False))
    proc = subprocess.run(
        [checkov, "--directory", str(tmp_path), "--framework", "dockerfile", "kubernetes", "--output", "json",
         "--skip-download"],
        capture_output=True, text=True, timeout=600)
    assert proc.returncode in (0, 1), proc.stderr[-2000:]
    reports = json.loads(proc.stdout)
    reports = reports if isinstance(reports, list) else [reports]
    by_type = {r["check_type"]: r for r in reports}
    assert {"dockerfile", "kubernetes"} <= by_type.keys(), list(by_type)
    failed = [f"{r['check_type']}: {c['check_id']} {c['check_name']} ({c['resource']} in {c['file_path']})"
              for r in reports for c in r["results"].get("failed_checks", [])]
    assert not failed, "\n".join(failed)
    for report in reports:
        assert report["summary"]["passed"] > 20, report["check_type"]  # it really checked something
        skipped = report["results"]["skipped_checks"]
        assert len(skipped) == report["summary"]["skipped"]
        for check in skipped:  # every skip says why
            assert len(check["check_result"].get("suppress_comment", "").strip()) > 20, check["check_id"]
