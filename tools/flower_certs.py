"""Certificates and keys for an encrypted, authenticated Flower deployment.

    python tools/flower_certs.py DIR [--hosts NAME_OR_IP ...] [--nodes N] [--days D]

writes into DIR (which must not hold any of these files yet):

- `ca.crt`, `ca.key`: a certificate authority of its own. `ca.crt` goes to every
  SuperNode (`--root-certificates`) and to the `flwr` CLI (`root-certificates`);
  `ca.key` only signs `server.crt`: keep it offline.
- `server.crt`, `server.key`: the SuperLink's TLS certificate (`--ssl-certfile`,
  `--ssl-keyfile`), valid for each `--hosts` name or IP address the nodes and the CLI
  dial, and always for localhost, 127.0.0.1 and ::1: the SuperLink's own ServerApp
  process reaches it there, over TLS, even when it listens on 0.0.0.0.
- `node<i>`, `node<i>.pub` (with `--nodes N`): SuperNode authentication key pairs,
  ECDSA P-384 in OpenSSH format, which is what Flower 1.42 reads
  (`flower-supernode --auth-supernode-private-key node0`,
  `flwr supernode register node0.pub`). A node may as well make its own pair with
  `ssh-keygen -t ecdsa -b 384 -N "" -f node0`, so its private key never travels.

Private keys are written readable by their owner only.
"""

from __future__ import annotations

import argparse
import datetime
import errno
import ipaddress
import os
import sys
from collections.abc import Sequence
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

# the SuperLink's ServerApp connects to 127.0.0.1 (or ::1) whatever address it binds,
# and verifies the certificate like any client does
LOCAL_NAMES = ("localhost", "127.0.0.1", "::1")


def _write(path: Path, data: bytes, private: bool = False) -> None:
    # O_EXCL: never overwrite a key someone may already have handed out
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600 if private else 0o644)
    with os.fdopen(fd, "wb") as f:
        f.write(data)


def _key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


def _subject_alt_names(hosts: Sequence[str]) -> list[x509.GeneralName]:
    names: list[x509.GeneralName] = []
    for host in dict.fromkeys([*LOCAL_NAMES, *hosts]):  # ordered, without duplicates
        try:
            names.append(x509.IPAddress(ipaddress.ip_address(host)))
        except ValueError:
            names.append(x509.DNSName(host))
    return names


def _certificate(subject: str, key, issuer: x509.Name | None, issuer_key, days: int,
                 ca: bool, hosts: Sequence[str] = ()) -> x509.Certificate:
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, subject)])
    now = datetime.datetime.now(datetime.timezone.utc)
    builder = (x509.CertificateBuilder()
               .subject_name(name).issuer_name(issuer or name).public_key(key.public_key())
               .serial_number(x509.random_serial_number())
               .not_valid_before(now - datetime.timedelta(minutes=5))  # tolerate clock skew between machines
               .not_valid_after(now + datetime.timedelta(days=days))
               .add_extension(x509.BasicConstraints(ca=ca, path_length=0 if ca else None), critical=True)
               # key identifiers: strict verification (Python 3.13's default, so httpx's) refuses a chain without
               .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
               .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(issuer_key.public_key()),
                              critical=False))
    if ca:
        builder = builder.add_extension(
            x509.KeyUsage(digital_signature=True, key_cert_sign=True, crl_sign=True, content_commitment=False,
                          key_encipherment=False, data_encipherment=False, key_agreement=False,
                          encipher_only=False, decipher_only=False), critical=True)
    else:
        builder = (builder
                   .add_extension(x509.SubjectAlternativeName(_subject_alt_names(hosts)), critical=False)
                   .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False))
    return builder.sign(issuer_key, hashes.SHA384())


def node_key_pair(directory: Path, name: str) -> tuple[Path, Path]:
    """Write a SuperNode authentication key pair `name` / `name.pub`; returns their paths."""
    key = ec.generate_private_key(ec.SECP384R1())
    private, public = directory / name, directory / f"{name}.pub"
    _write(private, key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH,
                                      serialization.NoEncryption()), private=True)
    _write(public, key.public_key().public_bytes(serialization.Encoding.OpenSSH,
                                                 serialization.PublicFormat.OpenSSH) + b"\n")
    return private, public


def make(directory: Path, hosts: Sequence[str] = (), nodes: int = 0, days: int = 365) -> dict[str, Path]:
    """Write the CA, the SuperLink's certificate and `nodes` SuperNode key pairs into
    `directory`; returns the paths by role (`ca`, `server_cert`, `server_key`, `node0`, ...)."""
    directory.mkdir(parents=True, exist_ok=True)
    names = ["ca.crt", "ca.key", "server.crt", "server.key"]
    names += [f"node{i}{suffix}" for i in range(nodes) for suffix in ("", ".pub")]
    for name in names:  # all or nothing: a half-written set would mix two CAs
        if (directory / name).exists():
            raise FileExistsError(errno.EEXIST, "exists already", str(directory / name))
    ca_key = ec.generate_private_key(ec.SECP384R1())
    ca_cert = _certificate("fedssl Flower CA", ca_key, None, ca_key, days, ca=True)
    server_key = ec.generate_private_key(ec.SECP384R1())
    server_cert = _certificate("fedssl SuperLink", server_key, ca_cert.subject, ca_key, days, ca=False,
                               hosts=hosts)
    paths = {"ca": directory / "ca.crt", "ca_key": directory / "ca.key",
             "server_cert": directory / "server.crt", "server_key": directory / "server.key"}
    _write(paths["ca"], ca_cert.public_bytes(serialization.Encoding.PEM))
    _write(paths["ca_key"], _key_pem(ca_key), private=True)
    _write(paths["server_cert"], server_cert.public_bytes(serialization.Encoding.PEM))
    _write(paths["server_key"], _key_pem(server_key), private=True)
    for node in range(nodes):
        paths[f"node{node}"], paths[f"node{node}_pub"] = node_key_pair(directory, f"node{node}")
    return paths


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("directory", type=Path)
    parser.add_argument("--hosts", nargs="+", default=[],
                        help="names and IP addresses the SuperLink is reached at (localhost, 127.0.0.1, ::1 always)")
    parser.add_argument("--nodes", type=int, default=0, help="SuperNode key pairs to make (node0, node1, ...)")
    parser.add_argument("--days", type=int, default=365, help="how long the certificates are valid")
    args = parser.parse_args()
    if args.nodes < 0 or args.days < 1:
        parser.error("--nodes must be >= 0 and --days >= 1")
    try:
        paths = make(args.directory, args.hosts, args.nodes, args.days)
    except FileExistsError as err:
        print(f"error: {err.filename} exists already; choose an empty directory", file=sys.stderr)
        return 2
    for role, path in paths.items():
        print(f"{role}: {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
