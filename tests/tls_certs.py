"""Certificates for the TLS tests, made at test time with `cryptography` (the dev extra): a CA, server
certificates for 127.0.0.1 and localhost, client certificates. Also a script for scripts/container_test.sh:

    python tests/tls_certs.py DIR   # DIR/ca.crt, DIR/server.crt, DIR/server.key, DIR/client.crt, DIR/client.key
"""

from __future__ import annotations

import datetime
import ipaddress
import sys
from dataclasses import dataclass
from pathlib import Path


@dataclass
class Issued:
    cert: Path
    key: Path


def issue(folder: Path, name: str, *, issuer: tuple | None = None, ca: bool = False, server: bool = False,
          expired: bool = False) -> tuple[Issued, tuple]:
    """A certificate and its key as PEM files; returns (files, (certificate, key)) to sign others with."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    now = datetime.datetime.now(datetime.UTC)
    start, end = ((now - datetime.timedelta(days=10), now - datetime.timedelta(days=1)) if expired
                  else (now - datetime.timedelta(hours=1), now + datetime.timedelta(days=2)))
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    issuer_cert, issuer_key = issuer if issuer else (None, key)
    builder = (x509.CertificateBuilder().subject_name(subject)
               .issuer_name(issuer_cert.subject if issuer_cert else subject)
               .public_key(key.public_key()).serial_number(x509.random_serial_number())
               .not_valid_before(start).not_valid_after(end)
               .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
               .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False))
    if ca:
        builder = builder.add_extension(x509.KeyUsage(digital_signature=True, content_commitment=False,
                                                      key_encipherment=False, data_encipherment=False,
                                                      key_agreement=False, key_cert_sign=True, crl_sign=True,
                                                      encipher_only=False, decipher_only=False), critical=True)
    else:
        usage = ExtendedKeyUsageOID.SERVER_AUTH if server else ExtendedKeyUsageOID.CLIENT_AUTH
        builder = (builder.add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
                   .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(issuer_key.public_key()),
                                  critical=False))
    if server:
        builder = builder.add_extension(x509.SubjectAlternativeName(
            [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]), critical=False)
    cert = builder.sign(issuer_key, hashes.SHA256())
    files = Issued(folder / f"{name}.crt", folder / f"{name}.key")
    files.cert.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    files.key.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                            serialization.NoEncryption()))
    return files, (cert, key)


def write_set(folder: Path) -> None:
    """A CA, a server certificate signed by it (127.0.0.1, localhost) and a client certificate."""
    folder.mkdir(parents=True, exist_ok=True)
    _, ca_pair = issue(folder, "ca", ca=True)
    issue(folder, "server", issuer=ca_pair, server=True)
    issue(folder, "client", issuer=ca_pair)
    (folder / "ca.key").unlink()  # nothing else is ever signed with it


if __name__ == "__main__":
    write_set(Path(sys.argv[1]))
