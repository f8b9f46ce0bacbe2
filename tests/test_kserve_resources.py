"""imgcls as a KServe runtime (k8s/kserve/, docs/kserve.md), checked offline.

- `kubectl kustomize k8s/kserve` renders (tests/test_k8s.py's helper), and each object validates against the
  vendored KServe CRD schema excerpts (tests/schemas/kserve/, strict: unknown fields fail), whose embedded
  Kubernetes types are kubernetes-validate's own definitions; broken copies fail, so the check is not vacuous.
- The runtime agrees with the server, the CLI and the image: every IMGCLS_* variable is a real `imgcls serve`
  flag, the command is the image's entrypoint, the ports and the probe are the server's, each
  InferenceService names a format and protocol the runtime declares and loads the matching artifact.
- KServe's model directory is an imgcls repository: the storageUri's contents copied to a stand-in for
  /mnt/models (what the storage initializer does) are served by a real server configured from the runtime's
  and the InferenceService's environment; a storageUri too deep (a model or a version folder) fails the
  start with a message saying what is expected.
"""

from __future__ import annotations

import copy
import json
import re
import shutil
import urllib.request
from dataclasses import replace
from pathlib import Path

import pytest
from test_k8s import ROOT, SERVER_UID, dockerfile_stages, kubectl, parse_cli, render, serve_flags

pytest_plugins = ["service_plugin"]

KSERVE = ROOT / "k8s" / "kserve"
SCHEMAS = ROOT / "tests" / "schemas" / "kserve"
DEFINITIONS = "https://kubernetes.io/api/_definitions.json"
# modelFormat.name -> the imgcls artifact format (IMGCLS_RUNTIME) that serves it
FORMAT_RUNTIME = {"onnx": "onnx", "tflite": "tflite", "tensorflow": "savedmodel"}
SCHEMA_FILES = {("serving.kserve.io/v1alpha1", "ClusterServingRuntime"): "clusterservingruntime.v1alpha1.json",
                ("serving.kserve.io/v1beta1", "InferenceService"): "inferenceservice.v1beta1.json"}

yaml = pytest.importorskip("yaml", reason="PyYAML missing: pip install -e '.[deploy]'")


# --- schemas -----------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def validators() -> dict:
    """(apiVersion, kind) -> a Draft 2020-12 validator, $refs resolving to kubernetes-validate's strict
    definitions of the newest Kubernetes it ships."""
    kv = pytest.importorskip("kubernetes_validate", reason="kubernetes-validate missing: pip install -e '.[deploy]'")
    import jsonschema
    from referencing import Registry, Resource

    version = kv.utils.latest_version()
    definitions = kv.utils.schema_contents(f"kubernetes-json-schema/v{version}-local-strict/_definitions.json",
                                           version)
    registry = Resource.from_contents(definitions) @ Registry()
    out = {}
    for key, file in SCHEMA_FILES.items():
        schema = inline(json.loads((SCHEMAS / file).read_text()), definitions["$defs"])
        jsonschema.Draft202012Validator.check_schema(schema)
        out[key] = jsonschema.Draft202012Validator(schema, registry=registry)
    return out


def inline(node, defs: dict):
    """Merge the Kubernetes definition named by "x-imgcls-inline" into the object that embeds it (KServe's
    `json:",inline"` fields): its properties join the object's, its `required` does not (KServe's CRD drops it),
    and unknown fields stay errors."""
    if isinstance(node, list):
        return [inline(item, defs) for item in node]
    if not isinstance(node, dict):
        return node
    node = {key: inline(value, defs) for key, value in node.items()}
    name = node.pop("x-imgcls-inline", None)
    if name is not None:
        embedded = defs[name]
        assert embedded.get("additionalProperties") is False, f"{name}: expected the strict definitions"
        node["properties"] = {**absolute(embedded["properties"]), **node.get("properties", {})}
        node["additionalProperties"] = False
    return node


def absolute(node):
    """The definitions' own "#/$defs/..." references, made absolute so they resolve from our schema too."""
    if isinstance(node, list):
        return [absolute(item) for item in node]
    if not isinstance(node, dict):
        return node
    return {key: DEFINITIONS + value if key == "$ref" and value.startswith("#/") else absolute(value)
            for key, value in node.items()}


def errors(validators: dict, doc: dict) -> list[str]:
    validator = validators[(doc["apiVersion"], doc["kind"])]
    return [f"{doc['kind']}/{doc['metadata']['name']}: {'.'.join(map(str, e.absolute_path))}: {e.message}"
            for e in validator.iter_errors(doc)]


# --- the resources -----------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def docs() -> list[dict]:
    """`kubectl kustomize k8s/kserve`; without kubectl, the files it lists as they are (the schema and
    consistency checks still run; only the rendering test skips)."""
    if shutil.which("kubectl"):
        return render(KSERVE)
    resources = yaml.safe_load((KSERVE / "kustomization.yaml").read_text())["resources"]
    return [doc for name in resources for doc in yaml.safe_load_all((KSERVE / name).read_text()) if doc]


def runtime_of(docs: list[dict]) -> dict:
    (runtime,) = [d for d in docs if d["kind"] == "ClusterServingRuntime"]
    return runtime


def services(docs: list[dict]) -> list[dict]:
    return [d for d in docs if d["kind"] == "InferenceService"]


def env_of(container: dict) -> dict[str, str]:
    env = {}
    for var in container.get("env", []):
        assert "value" in var, f"{var['name']}: only plain values (Knative refuses most valueFrom sources)"
        env[var["name"]] = var["value"]
    return env


def container_env(runtime: dict, service: dict) -> dict[str, str]:
    """The kserve-container's environment for one InferenceService: the runtime's, overridden by name by the
    InferenceService's model env (KServe merges the two containers)."""
    (container,) = runtime["spec"]["containers"]
    return {**env_of(container), **env_of(service["spec"]["predictor"]["model"])}


def test_renders_a_runtime_and_examples(docs):
    kubectl()  # skips without it
    kinds = sorted(d["kind"] for d in docs)
    assert kinds == ["ClusterServingRuntime", "InferenceService", "InferenceService"]
    (container,) = runtime_of(docs)["spec"]["containers"]
    assert container["image"].startswith("registry.example.com/imgcls:"), "kustomize `images` reaches the runtime"


def test_resources_validate_against_the_kserve_schemas(docs, validators):
    problems = [p for doc in docs for p in errors(validators, doc)]
    assert not problems, "\n".join(problems)


def test_schema_validation_is_not_vacuous(docs, validators):
    """Typos, wrong types and bad enum values, in KServe's fields and in the Kubernetes types they embed."""
    runtime = runtime_of(docs)
    service = next(s for s in services(docs) if s["metadata"]["name"] == "flowers")
    broken = []

    def mutate(doc, change):
        doc = copy.deepcopy(doc)
        change(doc)
        broken.append(doc)

    mutate(runtime, lambda d: d["spec"].update(protocolVersion=["v2"]))  # singular: not a field
    mutate(runtime, lambda d: d["spec"]["protocolVersions"].append("grpc-v3"))
    mutate(runtime, lambda d: d["spec"]["supportedModelFormats"][0].update(priority=0))
    mutate(runtime, lambda d: d["spec"]["supportedModelFormats"][0].pop("name"))
    mutate(runtime, lambda d: d["spec"]["containers"][0].update(imagePullPolicyy="Always"))
    mutate(runtime, lambda d: d["spec"]["containers"][0]["env"][0].update(value=8080))
    mutate(runtime, lambda d: d["spec"].pop("containers"))
    mutate(service, lambda d: d["spec"]["predictor"]["model"].update(storageURI="s3://x"))
    mutate(service, lambda d: d["spec"]["predictor"]["model"]["modelFormat"].pop("name"))
    mutate(service, lambda d: d["spec"]["predictor"]["model"].update(protocolVersion="http"))
    mutate(service, lambda d: d["spec"]["predictor"].update(minReplicas="1"))
    mutate(service, lambda d: d["spec"]["predictor"]["model"]["resources"]["limits"].update(cpu=[2]))
    mutate(service, lambda d: d["spec"].update(predictorr=d["spec"].pop("predictor")))
    for doc in broken:
        assert errors(validators, doc), f"accepted: {json.dumps(doc['spec'])[:300]}"
    # and the inlined Kubernetes fields are accepted where KServe inlines them
    ok = copy.deepcopy(service)
    ok["spec"]["predictor"]["model"]["args"] = ["--max-batch-size", "16"]
    ok["spec"]["predictor"]["nodeSelector"] = {"kubernetes.io/arch": "amd64"}
    assert not errors(validators, ok)


def test_docs_examples_validate(validators):
    """Every YAML block of docs/kserve.md is a whole object that validates: KServe's against the excerpts,
    Kubernetes' with kubernetes-validate (strict)."""
    kv = pytest.importorskip("kubernetes_validate")
    text = (ROOT / "docs" / "kserve.md").read_text()
    blocks = re.findall(r"^```yaml\n(.*?)^```", text, re.M | re.S)
    objects = [doc for block in blocks for doc in yaml.safe_load_all(block) if doc]
    assert {o["kind"] for o in objects} >= {"InferenceService", "Secret", "ServiceAccount"}
    for obj in objects:
        if (obj["apiVersion"], obj["kind"]) in validators:
            assert not errors(validators, obj)
        else:
            kv.validate(obj, kv.utils.latest_version(), strict=True)
    isvc = next(o for o in objects if o["kind"] == "InferenceService")
    runtime = yaml.safe_load((KSERVE / "clusterservingruntime.yaml").read_text())
    env = container_env(runtime, isvc)
    assert env["IMGCLS_RUNTIME"] == FORMAT_RUNTIME[isvc["spec"]["predictor"]["model"]["modelFormat"]["name"]]


def test_runtime_agrees_with_the_server_and_the_image(docs):
    runtime = runtime_of(docs)
    spec = runtime["spec"]
    assert {f["name"] for f in spec["supportedModelFormats"]} == set(FORMAT_RUNTIME)
    # never chosen for an InferenceService that does not name it: imgcls needs an imgcls repository
    assert not any(f.get("autoSelect") for f in spec["supportedModelFormats"])
    assert set(spec["protocolVersions"]) == {"v2", "grpc-v2"}
    assert spec.get("multiModel") is False

    (container,) = spec["containers"]
    assert container["name"] == "kserve-container"  # KServe merges the predictor into this one
    entrypoint = next(line for line in dockerfile_stages()["runtime"] if line.startswith("ENTRYPOINT"))
    assert json.loads(entrypoint.split(None, 1)[1]) == container["command"] == ["imgcls", "serve"]
    env = env_of(container)
    flags = serve_flags()
    assert set(env) <= set(flags), f"not `imgcls serve` settings: {sorted(set(env) - set(flags))}"
    args = parse_cli(["serve", *container.get("args", [])])
    assert args.command == "serve"
    assert env["IMGCLS_MODEL_REPOSITORY"] == "/mnt/models"  # KServe's model directory
    assert env["IMGCLS_HTTP_PORT"] == "8080"  # KServe's default container port
    assert env["IMGCLS_REQUIRE_MODELS"] == "true"

    probe = container["readinessProbe"]["httpGet"]
    assert probe["port"] == int(env["IMGCLS_HTTP_PORT"]) and probe["path"] == "/v2/health/ready"
    assert spec["annotations"]["prometheus.kserve.io/port"] == env["IMGCLS_METRICS_PORT"]
    assert spec["annotations"]["prometheus.kserve.io/path"] == "/metrics"

    sc = container["securityContext"]
    assert sc["runAsNonRoot"] is True and sc["runAsUser"] == SERVER_UID and sc["readOnlyRootFilesystem"] is True
    assert sc["capabilities"]["drop"] == ["ALL"] and sc["allowPrivilegeEscalation"] is False
    tmp = next(v for v in spec["volumes"] if v["name"] == "tmp")
    assert "sizeLimit" in tmp["emptyDir"]
    assert {"name": "tmp", "mountPath": "/tmp"} in container["volumeMounts"]


def test_inference_services_use_the_runtime(docs):
    from imgcls.runtimes import FORMATS

    runtime = runtime_of(docs)
    declared = {f["name"] for f in runtime["spec"]["supportedModelFormats"]}
    seen_protocols = set()
    for service in services(docs):
        name = service["metadata"]["name"]
        model = service["spec"]["predictor"]["model"]
        assert model["runtime"] == runtime["metadata"]["name"], name
        assert model["modelFormat"]["name"] in declared, name
        assert model["protocolVersion"] in runtime["spec"]["protocolVersions"], name
        seen_protocols.add(model["protocolVersion"])
        env = container_env(runtime, service)
        assert set(env) <= set(serve_flags()), name
        assert env["IMGCLS_RUNTIME"] == FORMAT_RUNTIME[model["modelFormat"]["name"]], name
        assert env["IMGCLS_RUNTIME"] in FORMATS, name
        scheme = model["storageUri"].split("://", 1)[0]
        assert scheme in {"pvc", "s3", "gs", "https", "hdfs", "webhdfs", "oci"}, name
        if model["protocolVersion"] == "grpc-v2":
            # KServe routes gRPC to the container port named h2c: the server's gRPC port
            (h2c,) = [p for p in model["ports"] if p["name"] == "h2c"]
            assert h2c["containerPort"] == int(env["IMGCLS_PORT"]), name
            # Knative allows one port, and the readiness probe is on the HTTP one
            assert service["metadata"]["annotations"]["serving.kserve.io/deploymentMode"] == "RawDeployment"
    assert seen_protocols == {"v2", "grpc-v2"}, "an example for each protocol"
    pvc = next(s for s in services(docs) if s["spec"]["predictor"]["model"]["storageUri"].startswith("pvc://"))
    claim = pvc["spec"]["predictor"]["model"]["storageUri"].removeprefix("pvc://").split("/")[0]
    base = yaml.safe_load_all((ROOT / "k8s" / "base" / "pvc.yaml").read_text())
    assert claim in {d["metadata"]["name"] for d in base}, "the PVC k8s/base creates and the CronJob fills"


# --- KServe's model directory is a repository ----------------------------------------------------------------

def configured_server(monkeypatch, env: dict[str, str], models: Path):
    """The ServeConfig `imgcls serve` builds from this environment (the real parser and serve_config), on
    loopback and free ports, with `models` standing in for /mnt/models."""
    from imgcls.cli import build_parser
    from imgcls.service.cli import serve_config

    for key, value in env.items():
        monkeypatch.setenv(key, value)
    args = build_parser().parse_args(["serve"])
    assert args.model_repository == "/mnt/models"
    monkeypatch.setenv("IMGCLS_MODEL_REPOSITORY", str(models))
    config, _workers = serve_config(build_parser().parse_args(["serve"]))
    return replace(config, host="127.0.0.1", port=0, metrics_port=0, http_port=0, inference_threads=1,
                   decode_workers=1, poll_interval=0, grace_period=2.0)


def get(port: int, path: str) -> tuple[int, dict]:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=10) as response:
            return response.status, json.loads(response.read() or b"{}")
    except urllib.error.HTTPError as exc:
        return exc.code, {}


def test_the_model_directory_is_served_as_a_repository(docs, service_repo, tmp_path, monkeypatch):
    from imgcls.service.server import InferenceServer

    runtime = runtime_of(docs)
    service = next(s for s in services(docs) if s["metadata"]["name"] == "flowers")
    env = container_env(runtime, service)
    probe = runtime["spec"]["containers"][0]["readinessProbe"]["httpGet"]["path"]

    # storageUri = the repository root: its contents land in /mnt/models
    models = tmp_path / "mnt" / "models"
    shutil.copytree(service_repo, models)
    config = configured_server(monkeypatch, env, models)
    assert config.require_models and config.runtime == env["IMGCLS_RUNTIME"]
    server = InferenceServer(config).start()
    try:
        assert server.wait_until_ready(60)
        assert get(server.http_port, probe)[0] == 200
        status, metadata = get(server.http_port, "/v2/models/tiny")  # the folder name is the model name
        assert status == 200 and metadata["name"] == "tiny"
    finally:
        server.stop()

    # storageUri too deep (a model folder, a version folder): the start fails and says what is expected
    from imgcls.errors import ImgclsError

    for too_deep in (service_repo / "tiny", service_repo / "tiny" / "2"):
        models = tmp_path / too_deep.name / "models"
        shutil.copytree(too_deep, models)
        config = configured_server(monkeypatch, env, models)
        with pytest.raises(ImgclsError, match=r"no models found \(expected NAME/VERSION/manifest.json\)"):
            InferenceServer(config).start()
