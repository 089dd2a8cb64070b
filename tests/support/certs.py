"""Test PKI made at test time with the ``openssl`` command line tool.

``make_pki(directory)`` writes a CA, a server certificate for 127.0.0.1 / localhost
(subjectAltName), a client certificate with CN ``node-a``, an expired client certificate
(same CA, CN ``node-a``, valid only in January 2020) and a client certificate with CN
``node-a`` from a different CA. EC P-256 keys keep it fast (well under a second).

The ``cryptography`` package is not a dependency of this project, so the CLI is used;
:func:`openssl_skip_reason` says why the TLS tests cannot run when it is missing.
"""

from __future__ import annotations

import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

_REQ_CONFIG = """\
[req]
distinguished_name = dn
prompt = no
[dn]
CN = placeholder
[v3_ca]
basicConstraints = critical, CA:TRUE
keyUsage = critical, keyCertSign, cRLSign
subjectKeyIdentifier = hash
[server]
basicConstraints = critical, CA:FALSE
keyUsage = critical, digitalSignature, keyEncipherment
extendedKeyUsage = serverAuth
subjectAltName = IP:127.0.0.1, DNS:localhost
[client]
basicConstraints = critical, CA:FALSE
keyUsage = critical, digitalSignature, keyEncipherment
extendedKeyUsage = clientAuth
"""

# `openssl ca` is the one portable way (OpenSSL 1.1 and 3.x) to choose validity dates.
_CA_CONFIG = """\
[ca]
default_ca = CA_default
[CA_default]
database = {dir}/index.txt
new_certs_dir = {dir}
serial = {dir}/serial.txt
policy = policy_any
default_md = sha256
unique_subject = no
x509_extensions = client
[policy_any]
commonName = supplied
[client]
basicConstraints = critical, CA:FALSE
keyUsage = critical, digitalSignature, keyEncipherment
extendedKeyUsage = clientAuth
"""


@dataclass(frozen=True)
class CertPair:
    cert: Path
    key: Path


@dataclass(frozen=True)
class Pki:
    ca: Path  # the CA certificate that signed server, client and expired
    server: CertPair  # SAN IP:127.0.0.1, DNS:localhost
    client: CertPair  # CN=node-a
    expired_client: CertPair  # CN=node-a, notAfter 2020-01-02
    foreign_ca: Path  # a second, unrelated CA
    foreign_client: CertPair  # CN=node-a, signed by foreign_ca


def openssl_skip_reason() -> str | None:
    if shutil.which("openssl") is None:
        return "cannot make test certificates: neither the cryptography package nor the openssl CLI is available"
    return None


def _run(*args: str, cwd: Path) -> None:
    result = subprocess.run(["openssl", *args], cwd=cwd, capture_output=True, text=True, timeout=30, check=False)
    if result.returncode != 0:
        raise RuntimeError(f"openssl {' '.join(args)} failed:\n{result.stderr[-2000:]}")


def _new_key_and_csr(directory: Path, name: str, cn: str, config: Path) -> tuple[Path, Path]:
    key, csr = directory / f"{name}.key", directory / f"{name}.csr"
    _run(
        "req", "-new", "-config", str(config), "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1",
        "-nodes", "-keyout", str(key), "-out", str(csr), "-subj", f"/CN={cn}",
        cwd=directory,
    )  # fmt: skip
    return key, csr


def _new_ca(directory: Path, name: str, cn: str, config: Path) -> tuple[Path, Path]:
    key, cert = directory / f"{name}.key", directory / f"{name}.pem"
    _run(
        "req", "-x509", "-config", str(config), "-extensions", "v3_ca", "-newkey", "ec",
        "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes", "-keyout", str(key), "-out", str(cert),
        "-days", "2", "-subj", f"/CN={cn}",
        cwd=directory,
    )  # fmt: skip
    return cert, key


def _sign(directory: Path, csr: Path, ca: tuple[Path, Path], out: str, section: str, config: Path, serial: int) -> Path:
    cert = directory / f"{out}.pem"
    _run(
        "x509", "-req", "-in", str(csr), "-CA", str(ca[0]), "-CAkey", str(ca[1]), "-set_serial", str(serial),
        "-days", "2", "-sha256", "-extfile", str(config), "-extensions", section, "-out", str(cert),
        cwd=directory,
    )  # fmt: skip
    return cert


def make_pki(directory: Path) -> Pki:
    directory.mkdir(parents=True, exist_ok=True)
    config = directory / "req.cnf"
    config.write_text(_REQ_CONFIG)
    ca = _new_ca(directory, "ca", "exo-remote test CA", config)
    foreign = _new_ca(directory, "foreign-ca", "some other CA", config)

    server_key, server_csr = _new_key_and_csr(directory, "server", "sidecar.test", config)
    server = CertPair(_sign(directory, server_csr, ca, "server", "server", config, 1001), server_key)
    client_key, client_csr = _new_key_and_csr(directory, "client", "node-a", config)
    client = CertPair(_sign(directory, client_csr, ca, "client", "client", config, 1002), client_key)
    foreign_key, foreign_csr = _new_key_and_csr(directory, "foreign-client", "node-a", config)
    foreign_cert = _sign(directory, foreign_csr, foreign, "foreign-client", "client", config, 2001)
    foreign_client = CertPair(foreign_cert, foreign_key)

    ca_dir = directory / "ca-db"
    ca_dir.mkdir(exist_ok=True)
    (ca_dir / "index.txt").write_text("")
    (ca_dir / "serial.txt").write_text("1003\n")
    ca_config = directory / "ca.cnf"
    ca_config.write_text(_CA_CONFIG.format(dir=ca_dir))
    expired_key, expired_csr = _new_key_and_csr(directory, "expired-client", "node-a", config)
    expired_cert = directory / "expired-client.pem"
    _run(
        "ca", "-batch", "-config", str(ca_config), "-cert", str(ca[0]), "-keyfile", str(ca[1]),
        "-in", str(expired_csr), "-out", str(expired_cert), "-notext",
        "-startdate", "20200101000000Z", "-enddate", "20200102000000Z",
        cwd=directory,
    )  # fmt: skip
    return Pki(
        ca=ca[0],
        server=server,
        client=client,
        expired_client=CertPair(expired_cert, expired_key),
        foreign_ca=foreign[0],
        foreign_client=foreign_client,
    )


def client_certificate(pki: Pki, cn: str, serial: int) -> CertPair:
    """One more client certificate from ``pki``'s CA, with common name ``cn`` (``serial``
    unique per PKI): the test CA signs whatever name a test needs."""
    directory = pki.ca.parent
    config = directory / "req.cnf"
    key, csr = _new_key_and_csr(directory, f"client-{cn}", cn, config)
    ca = (pki.ca, directory / "ca.key")
    return CertPair(_sign(directory, csr, ca, f"client-{cn}", "client", config, serial), key)
