"""TLS, mutual TLS and bearer tokens on the gRPC and HTTP ports (service/security.py, docs/security.md), with
real certificates made here by `cryptography`: a CA, server certificates for 127.0.0.1 and localhost (one of
them expired), a client certificate, and a second CA that trusts none of them."""

from __future__ import annotations

import json
import ssl
import subprocess
import sys
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import grpc
import pytest
from service_fixtures import metric, running_server, sample_image, scrape
from tls_certs import Issued, issue

from imgcls.client.client import Client, ServiceError
from imgcls.errors import ImgclsError
from imgcls.service.security import CERTIFICATE_REFUSAL, REFUSAL, Auth, Tokens, bearer, parse_tokens

pytest_plugins = ["service_plugin"]

TOKEN = "s3cret-token-0123456789abcdef"
IMAGE = sample_image(7, fmt="PNG")


@dataclass
class Pki:
    ca: Path
    server: Issued
    expired: Issued
    client: Issued
    other_ca: Path
    other_server: Issued  # signed by other_ca (a "rotated" certificate from a new CA)
    other_client: Issued  # signed by other_ca: not trusted by a server whose client CA is `ca`


@pytest.fixture(scope="module")
def pki(tmp_path_factory) -> Pki:
    folder = tmp_path_factory.mktemp("pki")
    ca, ca_pair = issue(folder, "ca", ca=True)
    other, other_pair = issue(folder, "other-ca", ca=True)
    return Pki(ca=ca.cert, server=issue(folder, "server", issuer=ca_pair, server=True)[0],
               expired=issue(folder, "expired", issuer=ca_pair, server=True, expired=True)[0],
               client=issue(folder, "client", issuer=ca_pair)[0], other_ca=other.cert,
               other_server=issue(folder, "other-server", issuer=other_pair, server=True)[0],
               other_client=issue(folder, "other-client", issuer=other_pair)[0])


def _predict(server, **kwargs) -> str:
    """The top label of one image over gRPC (no retries: a refused handshake is UNAVAILABLE at once)."""
    with Client(f"127.0.0.1:{server.port}", timeout=10, retries=0, **kwargs) as client:
        return client.predict([IMAGE], model="tiny").results[0].labels[0].name


def _code(server, **kwargs) -> grpc.StatusCode:
    """How one Predict ended."""
    try:
        _predict(server, **kwargs)
    except ServiceError as exc:
        return exc.code
    return grpc.StatusCode.OK


def _refusal(server, **kwargs) -> grpc.StatusCode:
    code = _code(server, **kwargs)
    assert code != grpc.StatusCode.OK, "expected a refusal"
    return code


def _https(server, path: str, ca: Path | None, token: str | None = None, cert: Issued | None = None,
           data: bytes | None = None) -> tuple[int, bytes]:
    context = ssl.create_default_context(cafile=str(ca)) if ca else ssl.create_default_context()
    if cert is not None:
        context.load_cert_chain(cert.cert, cert.key)
    request = urllib.request.Request(f"https://127.0.0.1:{server.http_port}{path}", data=data)
    if token is not None:
        request.add_header("Authorization", f"Bearer {token}")
    try:
        with urllib.request.urlopen(request, timeout=10, context=context) as response:
            return response.status, response.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read()
    except urllib.error.URLError as exc:  # the handshake's own error, for the tests to tell which it was
        if isinstance(exc.reason, ssl.SSLError):
            raise exc.reason from None
        raise


# --- the rule, without a server -------------------------------------------------------------------------------


def test_token_rule(tmp_path):
    path = tmp_path / "tokens"
    path.write_text("# comment\nold-token\n\nnew-token\n")
    auth = Auth(Tokens(["env-token"], path))
    assert auth.allows("/imgcls.v1.Inference/Predict", "Bearer old-token")
    assert auth.allows("/predict", "bearer new-token")
    assert auth.allows("/predict", "Bearer env-token")
    for value in (None, "", "Bearer", "Bearer ", "Basic old-token", "Bearer old-token2", "Bearer ld-token",
                  "old-token", "Bearer # comment"):
        assert not auth.allows("/predict", value), value
    for exempt in ("/grpc.health.v1.Health/Check", "/v2/health/ready", "/metrics"):
        assert auth.allows(exempt, None)
    assert not Auth(Tokens(["t"]), metrics_need_token=True).allows("/metrics", None)
    mutual = Auth(None, client_certificates=True)
    assert mutual.allows("/predict", None) and mutual.allows("/v2/health/live", None, client_certificate=False)
    assert mutual.refusal("/predict", None, client_certificate=False) == CERTIFICATE_REFUSAL
    assert bearer("Bearer  abc ") == b"abc"
    assert parse_tokens("a, b\nc", "env") == ["a", "b", "c"]
    (tmp_path / "empty").write_text("# nothing yet\n")
    with pytest.raises(ImgclsError, match="no token"):
        Tokens([], tmp_path / "empty")
    with pytest.raises(ImgclsError, match="missing"):
        Tokens([], tmp_path / "absent")


def test_token_file_rotation(tmp_path):
    path = tmp_path / "tokens"
    path.write_text("first\n")
    tokens = Tokens(file=path, check_interval=0)
    assert tokens.valid(b"first") and not tokens.valid(b"second")
    path.write_text("first\nsecond\n")  # rotation: both for a while
    assert tokens.valid(b"first") and tokens.valid(b"second")
    path.write_text("second\n")
    assert not tokens.valid(b"first") and tokens.valid(b"second")
    path.unlink()  # replaced by a Secret volume update: a moment without the file keeps the tokens
    assert tokens.valid(b"second")
    path.write_text("")  # emptied on purpose: nobody gets in
    assert not tokens.valid(b"second")


def test_flag_combinations(service_repo, pki):
    from imgcls.service.server import ServeConfig

    with pytest.raises(ImgclsError, match="go together"):
        ServeConfig(model_repository=service_repo, tls_cert=str(pki.server.cert)).validate()
    with pytest.raises(ImgclsError, match="needs --tls-cert"):
        ServeConfig(model_repository=service_repo, tls_client_ca=str(pki.ca)).validate()
    from imgcls.service.server import InferenceServer

    server = InferenceServer(ServeConfig(model_repository=service_repo, host="127.0.0.1", port=0, metrics_port=0,
                                         tls_cert=str(pki.server.cert), tls_key=str(pki.client.key)))
    try:  # the key of another certificate: refused before any port is bound
        with pytest.raises(ImgclsError, match="cannot load them together"):
            server.start()
    finally:
        server.stop()
    with pytest.raises(ImgclsError, match="token needs TLS"):
        Client("127.0.0.1:1", token=TOKEN)


def test_serve_flags_and_environment(monkeypatch, tmp_path):
    from imgcls.cli import build_parser
    from imgcls.service.cli import serve_config

    monkeypatch.setenv("IMGCLS_TOKENS", "tok-alpha-1, tok-beta-2")
    monkeypatch.setenv("IMGCLS_TLS_CERT", "/etc/tls/tls.crt")
    args = build_parser().parse_args(["serve", "--model-repository", str(tmp_path), "--workers", "1",
                                      "--tls-key", "/etc/tls/tls.key", "--token-file", "/etc/tokens",
                                      "--auth-metrics", "true"])
    config, _ = serve_config(args)
    assert (config.tls_cert, config.tls_key, config.tls_client_ca) == ("/etc/tls/tls.crt", "/etc/tls/tls.key", None)
    assert config.tokens == ["tok-alpha-1", "tok-beta-2"] and config.token_file == "/etc/tokens" and config.auth_metrics
    assert "tok-alpha-1" not in repr(config)  # tokens stay out of anything that prints the config


# --- TLS and tokens on a running server -----------------------------------------------------------------------


@pytest.fixture(scope="module")
def tls_server(service_repo, pki, tmp_path_factory):
    tokens = tmp_path_factory.mktemp("tokens") / "tokens"
    tokens.write_text(f"{TOKEN}\n")
    with running_server(service_repo, http_port=0, tls_cert=str(pki.server.cert), tls_key=str(pki.server.key),
                        token_file=str(tokens)) as server:
        server.token_path = tokens
        yield server


def test_tls_and_token_accepted(tls_server, pki):
    assert _predict(tls_server, tls_ca=pki.ca, token=TOKEN) in ("cat", "dog", "bird")
    with Client(f"127.0.0.1:{tls_server.port}", timeout=10, retries=0, tls_ca=pki.ca,
                tls_server_name="localhost") as client:
        assert client.health() == "SERVING"  # health needs no token
    with Client(f"127.0.0.1:{tls_server.port}", timeout=10, retries=0, tls_ca=pki.ca, token=TOKEN) as client:
        streamed = list(client.predict_stream([[IMAGE], [IMAGE, IMAGE]], model="tiny"))
        assert sorted(len(p.results) for p in streamed) == [1, 2]
    status, body = _https(tls_server, "/predict?model=tiny", pki.ca, TOKEN, data=IMAGE)
    assert status == 200, body
    assert json.loads(body)["results"][0]["labels"][0]["name"] in ("cat", "dog", "bird")
    assert _https(tls_server, "/v2/health/ready", pki.ca) == (200, b'{"ready":true}')
    assert _https(tls_server, "/metrics", pki.ca)[0] == 200  # exempt unless --auth-metrics


def test_plaintext_and_wrong_ca_refused(tls_server, pki):
    assert _refusal(tls_server) == grpc.StatusCode.UNAVAILABLE  # plaintext client, TLS server
    assert _refusal(tls_server, tls_ca=pki.other_ca, token=TOKEN) == grpc.StatusCode.UNAVAILABLE
    with pytest.raises(ssl.SSLCertVerificationError):
        _https(tls_server, "/v2/health/ready", pki.other_ca)
    with pytest.raises((urllib.error.URLError, ConnectionError)):  # plain HTTP to a TLS port: no HTTP answer
        urllib.request.urlopen(f"http://127.0.0.1:{tls_server.http_port}/v2/health/ready", timeout=10)


def test_missing_and_wrong_token_refused_alike(tls_server, pki):
    before = scrape(tls_server)
    codes = [_refusal(tls_server, tls_ca=pki.ca, token=token) for token in (None, "wrong", TOKEN + "x")]
    assert codes == [grpc.StatusCode.UNAUTHENTICATED] * 3
    with pytest.raises(ServiceError) as info:
        _predict(tls_server, tls_ca=pki.ca, token="wrong")
    assert info.value.message == REFUSAL  # the same words whatever was wrong
    with Client(f"127.0.0.1:{tls_server.port}", timeout=10, retries=0, tls_ca=pki.ca, token="wrong") as client:
        with pytest.raises(ServiceError) as info:  # a stream too, before any of its messages is read
            list(client.predict_stream([[IMAGE]], model="tiny"))
        assert info.value.code == grpc.StatusCode.UNAUTHENTICATED
    answers = [_https(tls_server, "/predict?model=tiny", pki.ca, token, data=IMAGE) for token in (None, "wrong")]
    assert answers[0] == answers[1]
    status, body = answers[0]
    assert status == 401 and json.loads(body) == {"error": REFUSAL, "code": "UNAUTHENTICATED"}
    after = scrape(tls_server)
    # counted as calls, before any model was resolved
    for method, count in (("Predict", 4), ("PredictStream", 1), ("http", 2)):
        sample = {"method": method, "code": "UNAUTHENTICATED"}
        assert metric(after, "imgcls_requests_total", **sample) - metric(before, "imgcls_requests_total",
                                                                          **sample) == count


def test_token_file_rotated_on_a_running_server(tls_server, pki):
    tls_server.token_path.write_text(f"{TOKEN}\nnext-token\n")
    _eventually(lambda: _code(tls_server, tls_ca=pki.ca, token="next-token") == grpc.StatusCode.OK)
    assert _code(tls_server, tls_ca=pki.ca, token=TOKEN) == grpc.StatusCode.OK  # both, while rotating
    tls_server.token_path.write_text("next-token\n")
    _eventually(lambda: _code(tls_server, tls_ca=pki.ca, token=TOKEN) == grpc.StatusCode.UNAUTHENTICATED)
    assert _https(tls_server, "/predict?model=tiny", pki.ca, TOKEN, data=IMAGE)[0] == 401
    assert _https(tls_server, "/predict?model=tiny", pki.ca, "next-token", data=IMAGE)[0] == 200
    tls_server.token_path.write_text(f"{TOKEN}\n")
    _eventually(lambda: _code(tls_server, tls_ca=pki.ca, token=TOKEN) == grpc.StatusCode.OK)


def _eventually(check, timeout: float = 10.0) -> None:
    """The token file is looked at once a second: retry a check that may see the old one."""
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, "the change was not seen in time"
        time.sleep(0.2)


def test_cli_predict_with_tls_and_token(tls_server, pki, tmp_path):
    image = tmp_path / "photo.png"
    image.write_bytes(IMAGE)
    command = [sys.executable, "-m", "imgcls.cli", "predict", "--target", f"localhost:{tls_server.port}",
               "--tls-ca", str(pki.ca), "--model", "tiny", "--json", "--timeout", "20", str(image)]
    done = subprocess.run([*command, "--token", TOKEN], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["labels"][0]["name"] in ("cat", "dog", "bird")
    refused = subprocess.run(command, capture_output=True, text=True, timeout=120,
                             env={**_env(), "IMGCLS_TOKEN": "wrong"})
    assert refused.returncode == 2 and "UNAUTHENTICATED" in refused.stderr + refused.stdout


def test_batch_and_async_client_with_tls_and_token(tls_server, pki, tmp_path):
    import asyncio

    from imgcls.client.aio import AsyncClient

    folder = tmp_path / "photos"
    folder.mkdir()
    for i in range(3):
        (folder / f"p{i}.png").write_bytes(sample_image(20 + i, fmt="PNG"))
    token_file = tmp_path / "token"
    token_file.write_text(f"# the batch job's token\n{TOKEN}\n")
    output = tmp_path / "out.jsonl"
    done = subprocess.run([sys.executable, "-m", "imgcls.cli", "batch", "--target", f"127.0.0.1:{tls_server.port}",
                           "--tls-ca", str(pki.ca), "--token-file", str(token_file), "--model", "tiny",
                           "--input", str(folder), "--output", str(output), "--no-progress"],
                          capture_output=True, text=True, timeout=120, env=_env())
    assert done.returncode == 0, done.stderr
    assert len([json.loads(line)["labels"] for line in output.read_text().splitlines()]) == 3

    async def classify(token: str) -> str:
        async with AsyncClient(f"127.0.0.1:{tls_server.port}", timeout=10, retries=0, tls_ca=pki.ca,
                               token=token) as client:
            return (await client.predict([IMAGE], model="tiny")).results[0].labels[0].name

    assert asyncio.run(classify(TOKEN)) in ("cat", "dog", "bird")
    with pytest.raises(ServiceError) as info:
        asyncio.run(classify("wrong"))
    assert info.value.code == grpc.StatusCode.UNAUTHENTICATED


def _env() -> dict[str, str]:
    import os

    return {k: v for k, v in os.environ.items() if k != "IMGCLS_TOKEN"}


@pytest.mark.slow
def test_certificate_files_rotated_in_place(service_repo, pki, tmp_path):
    """cert-manager rewrites tls.crt/tls.key in place: new handshakes on both ports get the new pair."""
    cert, key = tmp_path / "tls.crt", tmp_path / "tls.key"
    cert.write_bytes(pki.server.cert.read_bytes())
    key.write_bytes(pki.server.key.read_bytes())
    with running_server(service_repo, http_port=0, tls_cert=str(cert), tls_key=str(key)) as server:
        assert _predict(server, tls_ca=pki.ca)
        assert _refusal(server, tls_ca=pki.other_ca) == grpc.StatusCode.UNAVAILABLE
        key.write_bytes(pki.other_server.key.read_bytes())  # half-way: a key that does not match: ignored
        assert _predict(server, tls_ca=pki.ca)
        cert.write_bytes(pki.other_server.cert.read_bytes())
        assert _predict(server, tls_ca=pki.other_ca)
        assert _refusal(server, tls_ca=pki.ca) == grpc.StatusCode.UNAVAILABLE
        assert _https(server, "/v2/health/ready", pki.other_ca)[0] == 200
        with pytest.raises(ssl.SSLCertVerificationError):
            _https(server, "/v2/health/ready", pki.ca)


@pytest.mark.slow
def test_expired_server_certificate_refused(service_repo, pki):
    with running_server(service_repo, http_port=0, tls_cert=str(pki.expired.cert),
                        tls_key=str(pki.expired.key)) as server:
        assert _refusal(server, tls_ca=pki.ca) == grpc.StatusCode.UNAVAILABLE
        with pytest.raises(ssl.SSLCertVerificationError, match="expired"):
            _https(server, "/v2/health/ready", pki.ca)


@pytest.mark.slow
def test_mutual_tls(service_repo, pki):
    with running_server(service_repo, http_port=0, tls_cert=str(pki.server.cert), tls_key=str(pki.server.key),
                        tls_client_ca=str(pki.ca)) as server:
        mine = {"tls_cert": pki.client.cert, "tls_key": pki.client.key}
        assert _predict(server, tls_ca=pki.ca, **mine)
        assert _refusal(server, tls_ca=pki.ca) == grpc.StatusCode.UNAVAILABLE  # no client certificate
        assert _refusal(server, tls_ca=pki.ca, tls_cert=pki.other_client.cert,
                        tls_key=pki.other_client.key) == grpc.StatusCode.UNAVAILABLE  # signed by another CA
        assert _https(server, "/predict?model=tiny", pki.ca, cert=pki.client, data=IMAGE)[0] == 200
        # HTTP: no certificate reaches health only (a Kubernetes HTTPS probe has none), the rest is 401
        assert _https(server, "/v2/health/ready", pki.ca)[0] == 200
        status, body = _https(server, "/predict?model=tiny", pki.ca, data=IMAGE)
        assert status == 401 and json.loads(body) == {"error": CERTIFICATE_REFUSAL, "code": "UNAUTHENTICATED"}
        with pytest.raises((ssl.SSLError, urllib.error.URLError, ConnectionError)):  # a certificate of another CA
            _https(server, "/v2/health/ready", pki.ca, cert=pki.other_client)


# --- the Kubernetes component (k8s/components/tls) ------------------------------------------------------------


def test_kubernetes_tls_component(tmp_path):
    """prod + k8s/components/tls renders, validates, mounts what the variables name, and probes over HTTPS on
    health paths the token rule exempts; the batch Job's flags parse."""
    import os
    import shlex
    import shutil

    import yaml

    from imgcls.cli import build_parser
    from imgcls.service.security import HEALTH

    kubectl = shutil.which("kubectl")
    if kubectl is None:
        pytest.skip("kubectl not installed (apt-get install kubectl)")
    kv = pytest.importorskip("kubernetes_validate", reason="the deploy extra")
    root = Path(__file__).resolve().parents[1] / "k8s"
    (tmp_path / "kustomization.yaml").write_text(yaml.safe_dump({
        "apiVersion": "kustomize.config.k8s.io/v1beta1", "kind": "Kustomization", "namespace": "imgcls",
        "resources": [os.path.relpath(root / "overlays" / "prod", tmp_path)],
        "components": [os.path.relpath(root / "components" / "tls", tmp_path)]}))
    done = subprocess.run([kubectl, "kustomize", str(tmp_path)], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    docs = [d for d in yaml.safe_load_all(done.stdout) if d]
    for doc in docs:
        if doc["apiVersion"].startswith("cert-manager.io/"):
            continue
        if doc["apiVersion"] != "monitoring.coreos.com/v1":  # (tests/test_k8s.py checks that one)
            kv.validate(doc, kv.utils.latest_version(), strict=True)

    (certificate,) = [d for d in docs if d["kind"] == "Certificate"]
    (service,) = [d for d in docs if d["kind"] == "Service" and d["metadata"]["name"] == "imgcls"]
    assert service["metadata"]["name"] in certificate["spec"]["dnsNames"]  # the batch Job's --target host
    assert certificate["spec"]["usages"] == ["server auth"] and certificate["metadata"]["namespace"] == "imgcls"

    def secret_mounts(pod: dict, container: dict) -> dict[str, str]:
        secrets = {v["name"]: v["secret"] for v in pod["volumes"] if "secret" in v}
        mounts = {m["mountPath"]: secrets[m["name"]]["secretName"] for m in container["volumeMounts"]
                  if m["name"] in secrets}
        assert not [m for m in container["volumeMounts"] if m["name"] in secrets and "subPath" in m]
        return mounts

    (deployment,) = [d for d in docs if d["kind"] == "Deployment"]
    pod = deployment["spec"]["template"]["spec"]
    (server,) = pod["containers"]
    mounts = secret_mounts(pod, server)
    env = {e["name"]: e.get("value") for e in server["env"]}
    files = {env["IMGCLS_TLS_CERT"]: "imgcls-tls", env["IMGCLS_TLS_KEY"]: "imgcls-tls",
             env["IMGCLS_TOKEN_FILE"]: "imgcls-tokens"}
    for path, secret in files.items():
        assert mounts[str(Path(path).parent)] == secret, path
    serve = build_parser().parse_args(["serve", "--tls-cert", "x", "--tls-key", "y", "--token-file", "z"])
    assert serve.tls_cert == "x"  # the variables are the flags' (IMGCLS_ + the flag's name)
    ports = {p["name"]: p["containerPort"] for p in server["ports"]}
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        get = server[probe]["httpGet"]
        assert get["scheme"] == "HTTPS" and get["port"] in ports and get["path"] in HEALTH, probe

    (job,) = [d for d in docs if d["kind"] == "Job"]
    pod = job["spec"]["template"]["spec"]
    (batch,) = pod["containers"]
    args = build_parser().parse_args([*batch["command"][1:], *batch["args"]])
    mounts = secret_mounts(pod, batch)
    assert mounts[str(Path(args.tls_ca).parent)] == "imgcls-tls", shlex.join(batch["args"])
    assert mounts[str(args.token_file.parent)] == "imgcls-tokens"
    (tls_volume,) = [v for v in pod["volumes"] if v["name"] == "tls"]
    assert [i["key"] for i in tls_volume["secret"]["items"]] == ["ca.crt"]  # not the server's key
