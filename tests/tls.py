"""TLS for the tests: a certificate authority the suite makes with the ``openssl`` binary, and
a redis-server that speaks only TLS (``--port 0 --tls-port``).

Certificates use P-256 keys (fast to make) and live one session in a temporary directory:

- ``ca``: the CA the server trusts and clients are told to trust (``ssl_ca_certs``);
- ``server``: the server's certificate, for the host name ``localhost`` only (no IP
  address), so ``rediss://localhost`` verifies and ``rediss://127.0.0.1`` does not;
- ``client``: a client certificate signed by ``ca`` (``ssl_certfile``/``ssl_keyfile``);
- ``other_ca`` and ``stranger``: a second CA nobody trusts, and a client certificate it
  signed.
"""

from __future__ import annotations

import shutil
import subprocess
import urllib.parse
from dataclasses import dataclass
from pathlib import Path

import pytest
import redis
from conftest import RedisServer


def _openssl(*args: str, cwd: Path) -> None:
    subprocess.run(["openssl", *args], cwd=cwd, check=True, capture_output=True, timeout=30)


def _authority(directory: Path, name: str) -> None:
    _openssl(
        "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes",
        "-keyout", f"{name}.key", "-out", f"{name}.crt", "-days", "2", "-subj", f"/CN={name}",
        cwd=directory,
    )  # fmt: skip


def _signed(directory: Path, name: str, ca: str, extensions: str) -> None:
    _openssl(
        "req", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes",
        "-keyout", f"{name}.key", "-out", f"{name}.csr", "-subj", f"/CN={name}",
        cwd=directory,
    )  # fmt: skip
    (directory / f"{name}.ext").write_text(extensions)
    _openssl(
        "x509", "-req", "-in", f"{name}.csr", "-CA", f"{ca}.crt", "-CAkey", f"{ca}.key",
        "-CAcreateserial", "-out", f"{name}.crt", "-days", "2", "-extfile", f"{name}.ext",
        cwd=directory,
    )  # fmt: skip


@dataclass(frozen=True)
class Certificates:
    directory: Path

    def crt(self, name: str) -> str:
        return str(self.directory / f"{name}.crt")

    def key(self, name: str) -> str:
        return str(self.directory / f"{name}.key")


def make_certificates(directory: Path) -> Certificates:
    """A CA, a server certificate for ``localhost``, a client certificate, and a second CA
    with a client certificate of its own (see the module docstring)."""
    if shutil.which("openssl") is None:
        pytest.skip("the openssl binary is not installed")
    _authority(directory, "ca")
    _authority(directory, "other_ca")
    server = "subjectAltName=DNS:localhost\nextendedKeyUsage=serverAuth\n"
    _signed(directory, "server", "ca", server)
    _signed(directory, "client", "ca", "extendedKeyUsage=clientAuth\n")
    _signed(directory, "stranger", "other_ca", "extendedKeyUsage=clientAuth\n")
    return Certificates(directory)


class TLSRedis(RedisServer):
    """A redis-server that accepts only TLS connections, on ``port``; with
    ``auth_clients="yes"`` it also requires a client certificate signed by the CA."""

    def __init__(self, directory: Path, certs: Certificates, auth_clients: str = "no") -> None:
        super().__init__(directory)
        self.certs = certs
        self.auth_clients = auth_clients

    def url(self, host: str = "localhost", *, client: str | None = "client", **query: str) -> str:
        """A ``rediss://`` URL trusting the suite's CA, with ``client``'s certificate (None:
        without one); ``query`` adds or overrides options (``ssl_ca_certs=""`` drops it)."""
        options = {"ssl_ca_certs": self.certs.crt("ca")}
        if client is not None:
            options["ssl_certfile"] = self.certs.crt(client)
            options["ssl_keyfile"] = self.certs.key(client)
        options |= query
        kept = {name: value for name, value in options.items() if value}
        return f"rediss://{host}:{self.port}/0?{urllib.parse.urlencode(kept)}"

    def command(self, binary: str) -> list[str]:
        return [
            binary,
            "--port", "0",
            "--tls-port", str(self.port),
            "--bind", "127.0.0.1",
            "--tls-cert-file", self.certs.crt("server"),
            "--tls-key-file", self.certs.key("server"),
            "--tls-ca-cert-file", self.certs.crt("ca"),
            "--tls-auth-clients", self.auth_clients,
            "--dir", str(self.directory),
            "--save", "",
            "--appendonly", "no",
            "--protected-mode", "no",
        ]  # fmt: skip

    def not_started(self) -> None:
        pytest.skip("this redis-server cannot serve TLS (built without it?)")

    def client(self) -> redis.Redis:
        """A synchronous client with the suite's CA and client certificate."""
        return redis.Redis(
            host="localhost",
            port=self.port,
            ssl=True,
            ssl_ca_certs=self.certs.crt("ca"),
            ssl_certfile=self.certs.crt("client"),
            ssl_keyfile=self.certs.key("client"),
            socket_timeout=1,
        )
