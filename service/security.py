"""Transport security and authentication for the ports that carry requests (gRPC and HTTP); docs/security.md.

- **TLS** (`--tls-cert`, `--tls-key`) and **mutual TLS** (`--tls-client-ca`: a client must present a
  certificate that CA signed). The files are watched, not read once: cert-manager and Kubernetes Secret
  volumes replace them in place, and every new handshake on either port uses the files as they are now (the
  change is seen at the next handshake; connections already open keep the certificate they started with).
  A change is taken only once the files load together (a certificate with the key of the one before, half
  written, keeps the previous pair and is tried again at the next handshake).
- **Bearer tokens** (`--token-file`, IMGCLS_TOKENS): `authorization: Bearer <token>` as gRPC metadata or an
  HTTP header; several tokens are valid at once so that a new one can be handed out before the old one is
  removed; the file is re-read when it changes (at most once a second).

Both protocols go through ONE rule, `Auth.refusal(operation, authorization)`: the operation is the gRPC
method path or the HTTP path (with mTLS on HTTP, where a handshake without a client certificate is let
through so that probes reach health, the rule also refuses such a caller everything else); health (gRPC
`grpc.health.v1.Health`, KServe `ServerLive`/`ServerReady`, HTTP `/v2/health/live|ready`) never needs a token
(probes and load balancers carry none), nor does `/metrics` on the HTTP port unless `--auth-metrics` (the
metrics port serves the same figures without a token anyway). A refusal
says the same thing whether a token was missing, malformed or wrong: nothing tells a caller how close it got.
Refusals are recorded like any other call (`imgcls_requests_total{code="UNAUTHENTICATED"}`, the access log,
a trace), under the method's own label on gRPC and under `http` on HTTP; the request body is never read.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import os
import ssl
import tempfile
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import grpc

from imgcls.errors import ImgclsError

log = logging.getLogger(__name__)

# What a refused caller is told, on both protocols: the same words whatever was wrong.
REFUSAL = "authentication required: send a valid token as 'authorization: Bearer <token>'"
CERTIFICATE_REFUSAL = "authentication required: a client certificate signed by the server's client CA"
# Operations that never need a token: health, on both protocols.
HEALTH = frozenset({
    "/grpc.health.v1.Health/Check",
    "/grpc.health.v1.Health/Watch",
    "/inference.GRPCInferenceService/ServerLive",
    "/inference.GRPCInferenceService/ServerReady",
    "/v2/health/live",
    "/v2/health/ready",
})
METRICS_PATH = "/metrics"
TOKEN_CHECK_INTERVAL = 1.0  # seconds between looks at the token file's stat


# --- TLS ------------------------------------------------------------------------------------------------------


def _stamp(path: Path) -> tuple[int, int, int] | None:
    """What changes when a file is replaced or rewritten (inode for an atomic rename, as Kubernetes does)."""
    try:
        st = path.stat()
    except OSError:
        return None
    return st.st_ino, st.st_mtime_ns, st.st_size


@dataclass(frozen=True)
class Certificates:
    """One consistent set of the files' contents, and an SSLContext built from them (which proves they load:
    PEM that parses, a key that matches its certificate)."""

    generation: int
    cert: bytes
    key: bytes
    client_ca: bytes | None
    context: ssl.SSLContext


class CertificateFiles:
    """The server's certificate, key and (mTLS) client CA files, re-read when any of them changes.

    `current()` is cheap (a stat per file) and is called at every handshake, from gRPC's threads and from the
    event loop, hence the lock."""

    def __init__(self, cert: Path, key: Path, client_ca: Path | None = None) -> None:
        self.cert, self.key, self.client_ca = Path(cert), Path(key), (Path(client_ca) if client_ca else None)
        self._lock = threading.Lock()
        self._stamps: tuple | None = None
        self._failed: tuple | None = None  # stamps of a set that did not load (logged once)
        self._generation = 0
        stamps = self._files_stamps()  # before reading: a change while reading is seen at the next look
        self._current = self._load()  # raises ImgclsError at start: a server must not start without its cert
        self._stamps = stamps

    @property
    def mutual(self) -> bool:
        return self.client_ca is not None

    def _paths(self) -> list[Path]:
        return [self.cert, self.key] + ([self.client_ca] if self.client_ca else [])

    def _files_stamps(self) -> tuple:
        return tuple(_stamp(p) for p in self._paths())

    def _load(self) -> Certificates:
        flags = {self.cert: "--tls-cert", self.key: "--tls-key", self.client_ca: "--tls-client-ca"}
        contents = {}
        for path in self._paths():
            try:
                contents[path] = path.read_bytes()
            except OSError as exc:
                raise ImgclsError(f"{flags[path]} {path}: cannot read ({exc.strerror or exc})") from None
        ca = contents.get(self.client_ca) if self.client_ca else None
        self._generation += 1
        return Certificates(self._generation, contents[self.cert], contents[self.key], ca,
                            self._context(contents[self.cert], contents[self.key], ca))

    def _context(self, cert: bytes, key: bytes, ca: bytes | None,
                 verify: ssl.VerifyMode = ssl.CERT_REQUIRED) -> ssl.SSLContext:
        """A server SSLContext from the bytes read (load_cert_chain takes paths only: a private temporary copy,
        so that what is checked is exactly what gRPC is handed)."""
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        context.minimum_version = ssl.TLSVersion.TLSv1_2
        with tempfile.TemporaryDirectory(prefix="imgcls-tls-") as folder:  # mode 0700
            cert_path, key_path = Path(folder) / "tls.crt", Path(folder) / "tls.key"
            cert_path.write_bytes(cert)
            key_path.touch(mode=0o600)
            key_path.write_bytes(key)
            try:
                context.load_cert_chain(cert_path, key_path)
            except (ssl.SSLError, ValueError) as exc:
                raise ImgclsError(f"--tls-cert {self.cert} / --tls-key {self.key}: cannot load them together "
                                  f"({exc}); expected PEM files, the key matching the certificate") from None
        if ca is not None:
            try:
                context.load_verify_locations(cadata=ca.decode("ascii", "replace"))
            except (ssl.SSLError, ValueError) as exc:
                raise ImgclsError(f"--tls-client-ca {self.client_ca}: not a PEM CA certificate ({exc})") from None
            context.verify_mode = verify
        return context

    def current(self) -> Certificates:
        """The newest set that loads; the files are looked at (stat) on every call."""
        with self._lock:
            stamps = self._files_stamps()
            if stamps == self._stamps or stamps == self._failed:
                return self._current
            if None in stamps:  # a file missing for a moment while it is replaced: keep what works
                return self._current
            try:
                loaded = self._load()
            except ImgclsError as exc:
                self._failed = stamps
                log.warning("TLS files changed but do not load, still using the previous ones: %s", exc)
                return self._current
            self._current, self._stamps, self._failed = loaded, stamps, None
            log.info("TLS: loaded the new certificate files (%s)", self.cert)
            return loaded

    # --- gRPC --------------------------------------------------------------------------------------------------

    def grpc_credentials(self) -> grpc.ServerCredentials:
        """Server credentials whose certificate follows the files: gRPC asks the fetcher before each new
        connection's handshake; it answers a new configuration when the files changed, None otherwise."""
        given = [self._current.generation]

        def configuration(certs: Certificates):
            return grpc.ssl_server_certificate_configuration([(certs.key, certs.cert)],
                                                            root_certificates=certs.client_ca)

        def fetch():
            try:
                certs = self.current()
                if certs.generation == given[0]:
                    return None
                given[0] = certs.generation
                return configuration(certs)
            except Exception as exc:  # an exception here would fail the handshake, not just skip the reload
                log.warning("TLS reload for gRPC failed: %s", exc)
                return None

        return grpc.dynamic_ssl_server_credentials(configuration(self._current), fetch,
                                                   require_client_authentication=self.mutual)

    # --- HTTP --------------------------------------------------------------------------------------------------

    def http_context(self) -> ssl.SSLContext:
        """The context the HTTP site listens with. Its certificate and CA are swapped, at each handshake, for
        the newest files' through the SNI callback (which OpenSSL calls with or without SNI); the verify mode
        stays this context's, so mTLS can't be lost by a reload.

        With mTLS the client certificate is *optional* at the handshake here (a certificate sent is verified;
        a bad one fails the handshake) and required by `Auth.refusal` for everything but health: a Kubernetes
        HTTPS probe (no client certificate) can then still reach /v2/health/ready. On gRPC it is required at
        the handshake (gRPC offers no optional mode; kubelet's gRPC probes cannot speak TLS at all)."""
        site = self._context(self._current.cert, self._current.key, self._current.client_ca,
                             verify=ssl.CERT_OPTIONAL)

        def newest(ssl_object: ssl.SSLObject, server_name: str | None, context: ssl.SSLContext) -> None:
            try:
                ssl_object.context = self.current().context
            except Exception as exc:  # keep the site context rather than fail the handshake
                log.warning("TLS reload for HTTP failed: %s", exc)

        site.sni_callback = newest
        return site


# --- tokens ---------------------------------------------------------------------------------------------------


def parse_tokens(text: str, where: str) -> list[str]:
    """Tokens from a file (one a line, `#` comments and blank lines skipped) or IMGCLS_TOKENS (commas or
    whitespace between them). A token is printable ASCII without spaces: what an HTTP header can carry."""
    tokens = []
    for number, line in enumerate(text.splitlines(), 1):
        if line.lstrip().startswith("#"):
            continue
        for token in line.replace(",", " ").split():
            if not token.isascii() or not token.isprintable():
                raise ImgclsError(f"{where} line {number}: a token must be printable ASCII (no spaces)")
            tokens.append(token)
    return tokens


class Tokens:
    """The valid bearer tokens: fixed ones (IMGCLS_TOKENS) plus a file's, which is re-read when it changes."""

    def __init__(self, tokens: Iterable[str] = (), file: Path | None = None,
                 check_interval: float = TOKEN_CHECK_INTERVAL) -> None:
        self.fixed = [_digest(t.encode()) for t in tokens]
        self.file = Path(file) if file else None
        self.check_interval = check_interval
        self._lock = threading.Lock()
        self._from_file: list[bytes] = []
        self._stamp: tuple | None = None
        self._next_check = 0.0
        if self.file is not None:
            self._stamp = _stamp(self.file)
            if self._stamp is None:
                raise ImgclsError(f"--token-file {self.file}: cannot read it (missing?)")
            self._from_file = self._read()
        if not self.fixed and not self._from_file:
            raise ImgclsError(f"--token-file {self.file}: no token in it" if self.file else "no token given")

    def _read(self) -> list[bytes]:
        try:
            text = self.file.read_text("utf-8")
        except (OSError, UnicodeDecodeError) as exc:
            raise ImgclsError(f"--token-file {self.file}: cannot read it ({exc})") from None
        return [_digest(t.encode()) for t in parse_tokens(text, f"--token-file {self.file}")]

    def _refresh(self) -> None:
        now = time.monotonic()
        if self.file is None or now < self._next_check:
            return
        with self._lock:
            if now < self._next_check:
                return
            self._next_check = now + self.check_interval
            stamp = _stamp(self.file)
            if stamp is None or stamp == self._stamp:  # gone for a moment (a Secret being replaced): keep
                return
            try:
                tokens = self._read()
            except ImgclsError as exc:
                log.warning("%s; keeping the previous tokens", exc)
                return
            self._stamp = stamp
            if not tokens and not self.fixed:  # fail closed: an empty file revokes everything
                log.warning("--token-file %s has no token now: every call that needs one is refused", self.file)
            self._from_file = tokens
            log.info("--token-file %s re-read: %d token(s)", self.file, len(tokens))

    def valid(self, token: bytes) -> bool:
        """Constant time in the token's content and length: SHA-256 digests (all as long) are compared, every
        known one, whichever matches."""
        self._refresh()
        given = _digest(token)
        found = False
        for known in (*self.fixed, *self._from_file):
            found |= hmac.compare_digest(known, given)
        return found


def _digest(token: bytes) -> bytes:
    return hashlib.sha256(token).digest()


def bearer(authorization: str | None) -> bytes | None:
    """The token of an `authorization: Bearer <token>` value (scheme case-insensitive), else None."""
    if not authorization:
        return None
    scheme, _, token = authorization.strip().partition(" ")
    token = token.strip()
    if scheme.lower() != "bearer" or not token:
        return None
    return token.encode("utf-8", "surrogateescape")


class Auth:
    """THE rule both protocols apply: may this operation (gRPC method path or HTTP path) run with this
    `authorization` value (and, HTTP with mTLS, with or without a client certificate)?"""

    def __init__(self, tokens: Tokens | None, *, metrics_need_token: bool = False,
                 client_certificates: bool = False) -> None:
        """`tokens` None: no token needed. `client_certificates`: mTLS, where a handshake without a client
        certificate may happen (HTTP) and only the exempt operations may then run."""
        self.tokens = tokens
        self.client_certificates = client_certificates
        self.exempt = HEALTH if metrics_need_token else HEALTH | {METRICS_PATH}

    def allows(self, operation: str, authorization: str | None, *, client_certificate: bool = True) -> bool:
        return self.refusal(operation, authorization, client_certificate=client_certificate) is None

    def refusal(self, operation: str, authorization: str | None, *, client_certificate: bool = True) -> str | None:
        """None when allowed, else what the caller is told."""
        if operation in self.exempt:
            return None
        if self.client_certificates and not client_certificate:
            return CERTIFICATE_REFUSAL
        if self.tokens is None:
            return None
        token = bearer(authorization)
        return None if token is not None and self.tokens.valid(token) else REFUSAL


# --- the server's wiring --------------------------------------------------------------------------------------


@dataclass
class Security:
    """What `InferenceServer` wires into its ports: None where that feature is off."""

    certificates: CertificateFiles | None = None
    auth: Auth | None = None

    @classmethod
    def from_config(cls, config) -> Security:
        """From ServeConfig's tls_* / token_file / tokens / auth_metrics; ImgclsError names a bad flag."""
        certificates = None
        if config.tls_cert or config.tls_key:
            certificates = CertificateFiles(Path(config.tls_cert), Path(config.tls_key),
                                            Path(config.tls_client_ca) if config.tls_client_ca else None)
        tokens = None
        if config.token_file or config.tokens:
            tokens = Tokens(config.tokens, Path(config.token_file) if config.token_file else None)
            if certificates is None:
                log.warning("bearer tokens without TLS: tokens cross the network in clear text (--tls-cert)")
        mutual = certificates is not None and certificates.mutual
        auth = None
        if tokens is not None or mutual:
            auth = Auth(tokens, metrics_need_token=config.auth_metrics, client_certificates=mutual)
        return cls(certificates, auth)

    @property
    def tokens(self) -> bool:
        return self.auth is not None and self.auth.tokens is not None

    def describe(self) -> str:
        tls = ("mutual TLS" if self.certificates.mutual else "TLS") if self.certificates else "plaintext"
        return f"{tls}, {'bearer tokens' if self.tokens else 'no tokens'}"


def check_files(cert: str | None, key: str | None, client_ca: str | None) -> None:
    """The flag combinations that make sense (ServeConfig.validate)."""
    if bool(cert) != bool(key):
        raise ImgclsError("--tls-cert and --tls-key go together: give both, or neither")
    if client_ca and not cert:
        raise ImgclsError("--tls-client-ca (mutual TLS) needs --tls-cert and --tls-key too")
    for flag, path in (("--tls-cert", cert), ("--tls-key", key), ("--tls-client-ca", client_ca)):
        if path and not os.path.isfile(path):
            raise ImgclsError(f"{flag} {path}: no such file")


def metadata_value(metadata: Sequence[tuple[str, str | bytes]] | None, key: str) -> str | None:
    for name, value in metadata or ():
        if name == key and isinstance(value, str):
            return value
    return None


def method_label(method: str) -> str:
    """The `method` label the core records a gRPC method under (native and KServe: the name; TF Serving:
    tfserving.NAME); another service's method keeps its full path."""
    service, _, name = method.lstrip("/").rpartition("/")
    if service in ("imgcls.v1.Inference", "inference.GRPCInferenceService"):
        return name
    if service.startswith("tensorflow.serving."):
        return f"tfserving.{name}"
    return method


class AuthInterceptor(grpc.aio.ServerInterceptor):
    """The token rule on the gRPC port. A refused call is answered UNAUTHENTICATED before its request is read
    or parsed, and recorded through `refused(method_label, peer)`."""

    def __init__(self, auth: Auth, refused: Callable[[str, str], None]) -> None:
        self.auth = auth
        self.refused = refused

    async def intercept_service(self, continuation, handler_call_details: grpc.HandlerCallDetails):
        method = handler_call_details.method
        if self.auth.allows(method, metadata_value(handler_call_details.invocation_metadata, "authorization")):
            return await continuation(handler_call_details)
        known = await continuation(handler_call_details) is not None
        label = method_label(method) if known else "grpc"  # unknown methods: one label, not one per name sent
        refused = self.refused

        async def refuse(request_iterator, context: grpc.aio.ServicerContext):
            refused(label, context.peer() or "")
            await context.abort(grpc.StatusCode.UNAUTHENTICATED, REFUSAL)

        # stream-stream whatever the method's kind: the request is never read, whichever shape it has
        return grpc.stream_stream_rpc_method_handler(refuse)


def recorder(core) -> Callable[[str, str], None]:
    """Records a refused call as the core records every call (metrics, access log, trace), with no model."""
    from imgcls.service.core import Call

    def refused(method: str, peer: str) -> None:
        core.record(Call(method, time.monotonic(), None, code=grpc.StatusCode.UNAUTHENTICATED,
                         message="no valid bearer token", peer=peer))
    return refused
