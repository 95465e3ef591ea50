"""A stand-in for Cloud SQL's side of the Cloud SQL Python Connector, on 127.0.0.1.

The real connector does four things against Google, each answered here:

- it exchanges a service account's signed JWT for an access token (``OAuthServer``);
- it asks the Cloud SQL Admin API for the instance's addresses and server CA
  (``connectSettings``), and for an ephemeral client certificate for its own key
  (``generateEphemeralCert``), with an IAM login token when IAM authentication is on;
- it opens TLS 1.3 to the instance's server-side proxy on port 3307, presenting that
  certificate (``ServerSideProxy``), which forwards plain PostgreSQL protocol to the
  test server, as Cloud SQL's proxy does.

Every key, certificate and token is made at run time; none is stored anywhere.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import datetime
import json
import random
import re
import secrets
import socket
import ssl
import struct
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import padding, rsa
from cryptography.x509.oid import NameOID

from tests.google.server import Answer, JsonServer, Received

ADMIN_SCOPE = "https://www.googleapis.com/auth/sqlservice.admin"
LOGIN_SCOPE = "https://www.googleapis.com/auth/sqlservice.login"
PROXY_PORT = 3307  # fixed by the connector
SSL_REQUEST = 80877103


def _key() -> rsa.RSAPrivateKey:
    return rsa.generate_private_key(public_exponent=65537, key_size=2048)


def _pem(certificate: x509.Certificate) -> str:
    return certificate.public_bytes(serialization.Encoding.PEM).decode()


def _name(common_name: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])


class Authority:
    """A throwaway certificate authority."""

    def __init__(self, common_name: str) -> None:
        self.key = _key()
        now = datetime.datetime.now(datetime.UTC)
        self.certificate = (
            x509.CertificateBuilder()
            .subject_name(_name(common_name))
            .issuer_name(_name(common_name))
            .public_key(self.key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .sign(self.key, hashes.SHA256())
        )

    def issue(
        self, public_key: Any, common_name: str, lifetime: datetime.timedelta
    ) -> x509.Certificate:
        """A leaf certificate for ``public_key``, valid from a minute ago for ``lifetime``."""
        now = datetime.datetime.now(datetime.UTC)
        return (
            x509.CertificateBuilder()
            .subject_name(_name(common_name))
            .issuer_name(self.certificate.subject)
            .public_key(public_key)
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=1))
            .not_valid_after(now + lifetime)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .sign(self.key, hashes.SHA256())
        )


@dataclass
class Token:
    """An access token handed out, and for whom."""

    account: str
    scopes: set[str]


class OAuthServer(JsonServer):
    """Google's token endpoint for service accounts: a signed JWT in, an access token out."""

    def __init__(self) -> None:
        super().__init__()
        self.key = _key()
        self.account = "functions@acme-prod.iam.gserviceaccount.com"
        self.tokens: dict[str, Token] = {}
        self.route("POST", "/token", self._token)

    def credentials_file(self, folder: Path) -> Path:
        """A service-account key file whose token endpoint is this server."""
        private_key = self.key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        ).decode()
        path = folder / "service-account.json"
        path.write_text(
            json.dumps(
                {
                    "type": "service_account",
                    "project_id": "acme-prod",
                    "private_key_id": secrets.token_hex(8),
                    "private_key": private_key,
                    "client_email": self.account,
                    "client_id": "1",
                    "token_uri": f"{self.url}/token",
                }
            )
        )
        path.chmod(0o600)
        return path

    def _token(self, request: Received, match: re.Match[str]) -> Answer:
        form = parse_qs(request.body.decode())
        header, payload, signature = form["assertion"][0].split(".")
        try:
            self.key.public_key().verify(
                _unb64(signature),
                f"{header}.{payload}".encode(),
                padding.PKCS1v15(),
                hashes.SHA256(),
            )
        except Exception:  # noqa: BLE001  # any bad signature is the same refusal
            return Answer(400, {"error": "invalid_grant"})
        claims = json.loads(_unb64(payload))
        token = "ya29.stand-in-" + secrets.token_urlsafe(24)
        self.tokens[token] = Token(claims["iss"], set(claims.get("scope", "").split()))
        return Answer(200, {"access_token": token, "expires_in": 3600, "token_type": "Bearer"})

    def holder(self, authorization: str | None, scope: str) -> str | None:
        """The account a bearer token was issued to, if it carries ``scope``."""
        token = self.tokens.get((authorization or "").removeprefix("Bearer "))
        return token.account if token and scope in token.scopes else None


def _unb64(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


@dataclass
class Issued:
    """An ephemeral client certificate the Admin API signed."""

    serial: int
    not_after: datetime.datetime
    iam_user: str | None  # the database user the certificate logs in, with IAM authentication


class AdminApi(JsonServer):
    """The two Cloud SQL Admin API calls the connector makes, for one instance."""

    def __init__(self, oauth: OAuthServer, instance: str, address: str) -> None:
        super().__init__()
        self.oauth = oauth
        self.project, self.region, self.instance = instance.split(":")
        self.address = address
        self.server_ca = Authority("Google Cloud SQL Server CA (stand-in)")
        self.client_ca = Authority("Google Cloud SQL Client CA (stand-in)")
        self.certificate_lifetime = datetime.timedelta(hours=1)
        self.refuse_certificates = False  # as when the account lost roles/cloudsql.client
        self.issued: list[Issued] = []
        base = rf"/sql/v1beta4/projects/{self.project}/instances/{self.instance}"
        self.route("GET", base + "/connectSettings", self._connect_settings)
        self.route("POST", base + ":generateEphemeralCert", self._ephemeral_certificate)

    def _forbidden(self) -> Answer:
        return Answer(403, {"error": {"code": 403, "message": "not authorized (stand-in)"}})

    def _connect_settings(self, request: Received, match: re.Match[str]) -> Answer:
        if self.oauth.holder(request.headers.get("authorization"), ADMIN_SCOPE) is None:
            return self._forbidden()
        return Answer(200, {
            "kind": "sql#connectSettings",
            "region": self.region,
            "databaseVersion": "POSTGRES_15",
            "backendType": "SECOND_GEN",
            "ipAddresses": [
                {"type": "PRIMARY", "ipAddress": self.address},
                {"type": "PRIVATE", "ipAddress": self.address},
            ],
            "serverCaCert": {"cert": _pem(self.server_ca.certificate)},
            "pscEnabled": False,
        })  # fmt: skip

    def _ephemeral_certificate(self, request: Received, match: re.Match[str]) -> Answer:
        if self.refuse_certificates:
            return self._forbidden()
        if self.oauth.holder(request.headers.get("authorization"), ADMIN_SCOPE) is None:
            return self._forbidden()
        body = request.json()
        iam_user = None
        if "access_token" in body:
            account = self.oauth.holder(f"Bearer {body['access_token']}", LOGIN_SCOPE)
            if account is None:
                return self._forbidden()
            iam_user = account.removesuffix(".gserviceaccount.com")
        public_key = serialization.load_pem_public_key(body["public_key"].encode())
        certificate = self.client_ca.issue(public_key, "ephemeral", self.certificate_lifetime)
        self.issued.append(
            Issued(certificate.serial_number, certificate.not_valid_after_utc, iam_user)
        )
        return Answer(200, {"ephemeralCert": {"kind": "sql#sslCert", "cert": _pem(certificate)}})


@dataclass
class Tunnel:
    """One TLS connection through the proxy."""

    serial: int
    user: str | None = None
    open: bool = True


@dataclass
class ServerSideProxy:
    """TLS 1.3 on port 3307 with a required client certificate, forwarding to PostgreSQL."""

    admin: AdminApi
    backend_port: int
    tunnels: list[Tunnel] = field(default_factory=list)
    _loop: asyncio.AbstractEventLoop = field(default_factory=asyncio.new_event_loop)
    _thread: threading.Thread = field(init=False)
    _server: asyncio.Server = field(init=False)

    def start(self) -> ServerSideProxy:
        folder = Path(tempfile.mkdtemp(prefix="cloudsql-proxy-"))
        key = _key()
        certificate = self.admin.server_ca.issue(
            key.public_key(), "stand-in-instance", datetime.timedelta(hours=2)
        )
        (folder / "server.pem").write_text(
            _pem(certificate)
            + key.private_bytes(
                serialization.Encoding.PEM,
                serialization.PrivateFormat.PKCS8,
                serialization.NoEncryption(),
            ).decode()
        )
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        context.minimum_version = ssl.TLSVersion.TLSv1_3
        context.load_cert_chain(folder / "server.pem")
        context.verify_mode = ssl.CERT_REQUIRED
        context.load_verify_locations(cadata=_pem(self.admin.client_ca.certificate))
        for path in folder.iterdir():
            path.unlink()
        folder.rmdir()
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True)
        self._thread.start()
        self._server = asyncio.run_coroutine_threadsafe(
            asyncio.start_server(self._tunnel, self.admin.address, PROXY_PORT, ssl=context),
            self._loop,
        ).result(10)
        return self

    def stop(self) -> None:
        async def close() -> None:
            self._server.close()
            tasks = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)

        asyncio.run_coroutine_threadsafe(close(), self._loop).result(10)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(10)
        self._loop.close()

    @property
    def open_tunnels(self) -> int:
        return sum(tunnel.open for tunnel in self.tunnels)

    async def _tunnel(self, client: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        der = writer.get_extra_info("ssl_object").getpeercert(binary_form=True)
        serial = x509.load_der_x509_certificate(der).serial_number
        tunnel = Tunnel(serial)
        self.tunnels.append(tunnel)
        issued = next((i for i in self.admin.issued if i.serial == serial), None)
        try:
            if issued is None:
                return
            server_reader, server_writer = await asyncio.open_connection(
                "127.0.0.1", self.backend_port
            )
            try:
                first = await _startup(client, writer, server_reader, server_writer)
                tunnel.user = _startup_user(first)
                if issued.iam_user is not None and tunnel.user != issued.iam_user:
                    writer.write(_error_response("28000", "IAM principal does not match user"))
                    return
                server_writer.write(first)
                await asyncio.gather(_pump(client, server_writer), _pump(server_reader, writer))
            finally:
                server_writer.close()
        finally:
            tunnel.open = False
            with contextlib.suppress(Exception):
                writer.close()


async def _startup(
    client: asyncio.StreamReader,
    client_writer: asyncio.StreamWriter,
    server: asyncio.StreamReader,
    server_writer: asyncio.StreamWriter,
) -> bytes:
    """Relay SSLRequests (the server refuses them: the tunnel is the encryption) and return
    the client's startup message, not yet sent on."""
    while True:
        header = await client.readexactly(8)
        length, code = struct.unpack("!ii", header)
        if code != SSL_REQUEST:
            return header + await client.readexactly(length - 8)
        server_writer.write(header)
        answer = await server.readexactly(1)
        client_writer.write(answer)
        if answer != b"N":
            raise ConnectionError("the server behind the proxy must not speak TLS")


def _startup_user(message: bytes) -> str | None:
    fields = message[8:].split(b"\0")
    pairs = dict(zip(fields[::2], fields[1::2], strict=False))
    user = pairs.get(b"user")
    return user.decode() if user is not None else None


def _error_response(code: str, message: str) -> bytes:
    body = b"SFATAL\0C" + code.encode() + b"\0M" + message.encode() + b"\0\0"
    return b"E" + struct.pack("!i", len(body) + 4) + body


async def _pump(source: asyncio.StreamReader, target: asyncio.StreamWriter) -> None:
    try:
        while data := await source.read(65536):
            target.write(data)
            await target.drain()
    except (ConnectionError, ssl.SSLError):
        pass
    finally:
        with contextlib.suppress(Exception):
            target.close()


def free_loopback_address() -> str:
    """A 127.x.y.z address whose port 3307 is free (the connector always dials 3307)."""
    for _ in range(50):
        address = f"127.{random.randint(1, 254)}.{random.randint(1, 254)}.{random.randint(2, 254)}"
        with socket.socket() as probe:
            try:
                probe.bind((address, PROXY_PORT))
            except OSError:
                continue
            return address
    raise RuntimeError("no loopback address with a free port 3307")


@dataclass
class CloudSql:
    """The whole stand-in: token endpoint, Admin API and server-side proxy for one instance."""

    oauth: OAuthServer
    admin: AdminApi
    proxy: ServerSideProxy
    credentials: Path

    @classmethod
    def start(cls, instance: str, backend_port: int, folder: Path) -> CloudSql:
        oauth = OAuthServer().start()
        admin = AdminApi(oauth, instance, free_loopback_address()).start()
        proxy = ServerSideProxy(admin, backend_port).start()
        return cls(oauth, admin, proxy, oauth.credentials_file(folder))

    def environment(self) -> dict[str, str]:
        """What a process needs to reach the stand-in through the real connector."""
        return {
            "GOOGLE_APPLICATION_CREDENTIALS": str(self.credentials),
            "CLOUD_SQL_ADMIN_API_ENDPOINT": self.admin.url,
        }

    def wait_for_tunnels(self, count: int, seconds: float = 10) -> None:
        deadline = time.monotonic() + seconds
        while self.proxy.open_tunnels != count:
            assert time.monotonic() < deadline, f"{self.proxy.open_tunnels} tunnels open"
            time.sleep(0.05)

    def stop(self) -> None:
        self.proxy.stop()
        self.admin.stop()
        self.oauth.stop()
