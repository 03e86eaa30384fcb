"""tools/flower_certs.py makes what Flower 1.42 accepts, and the deployment commands
in docs/deployment.md use flags Flower has: fast checks, the loopback test runs the real thing."""

import re
import socket
import ssl
import subprocess
import sys
import threading
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "tools"))
import flower_certs  # noqa: E402


def handshake(paths: dict[str, Path], server_hostname: str) -> None:
    """A TLS handshake with the server certificate, verified against the CA as a node
    does; raises ssl.SSLCertVerificationError when the certificate does not name the host."""
    server_ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    server_ctx.load_cert_chain(paths["server_cert"], paths["server_key"])
    client_ctx = ssl.create_default_context(cafile=str(paths["ca"]))
    client_ctx.verify_flags |= ssl.VERIFY_X509_STRICT  # Python 3.13's default: httpx, so Flower, checks this strictly
    left, right = socket.socketpair()
    server = threading.Thread(target=lambda: _serve(server_ctx, right), daemon=True)
    server.start()
    try:
        with client_ctx.wrap_socket(left, server_hostname=server_hostname) as tls:
            tls.sendall(b"ping")
            assert tls.recv(4) == b"pong"
    finally:
        left.close()
        server.join(5)


def _serve(ctx: ssl.SSLContext, sock: socket.socket) -> None:
    try:
        with ctx.wrap_socket(sock, server_side=True) as tls:
            if tls.recv(4) == b"ping":
                tls.sendall(b"pong")
    except (ssl.SSLError, OSError):
        pass  # the client refused us: its side raises
    finally:
        sock.close()


def test_the_server_certificate_names_the_given_hosts_and_the_loopback(tmp_path):
    paths = flower_certs.make(tmp_path, hosts=["a.example.org", "10.0.0.1"])
    for host in ("a.example.org", "10.0.0.1", "127.0.0.1", "localhost", "::1"):
        handshake(paths, host)
    with pytest.raises(ssl.SSLCertVerificationError):
        handshake(paths, "b.example.org")
    assert (paths["server_key"].stat().st_mode & 0o777) == 0o600 and (paths["ca_key"].stat().st_mode & 0o777) == 0o600


def test_node_keys_load_as_flower_loads_them(tmp_path):
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.hazmat.primitives.serialization import load_ssh_private_key
    from flwr.cli.supernode.register import try_load_public_key

    paths = flower_certs.make(tmp_path, nodes=2)
    private = load_ssh_private_key(paths["node1"].read_bytes(), None)  # as flower-supernode does
    assert isinstance(private, ec.EllipticCurvePrivateKey) and private.curve.name == "secp384r1"
    assert try_load_public_key(paths["node1_pub"])  # as `flwr supernode register` does
    assert paths["node0"].read_bytes() != paths["node1"].read_bytes()


def test_an_existing_file_is_never_overwritten(tmp_path):
    flower_certs.node_key_pair(tmp_path, "node1")
    before = (tmp_path / "node1").read_bytes()
    with pytest.raises(FileExistsError, match="node1"):
        flower_certs.make(tmp_path, nodes=2)
    assert (tmp_path / "node1").read_bytes() == before and not (tmp_path / "ca.crt").exists()  # nothing written
    done = subprocess.run([sys.executable, str(ROOT / "tools" / "flower_certs.py"), str(tmp_path), "--nodes", "2"],
                          capture_output=True, text=True)
    assert done.returncode == 2 and "node1 exists already" in done.stderr


def readme_commands(program: str) -> list[str]:
    """The deployment page's `program` command lines, continuation lines joined."""
    text = (ROOT / "docs" / "deployment.md").read_text().replace("\\\n", " ")
    return [line for line in text.splitlines() if line.startswith(program + " ")]


@pytest.mark.slow
@pytest.mark.parametrize("program", ["flower-superlink", "flower-supernode"])
def test_the_readme_deployment_uses_flags_flower_has(program):
    commands = readme_commands(program)
    assert commands, f"no {program} command in docs/deployment.md"
    flags = {flag for line in commands for flag in re.findall(r"(?<!\S)(--[a-z-]+)", line)}
    assert "--insecure" not in flags  # the deployment shown is the encrypted one
    helps = subprocess.run([str(Path(sys.executable).parent / program), "--help"],
                           capture_output=True, text=True, timeout=60).stdout
    assert not [flag for flag in flags if flag not in helps], helps
