"""Who may talk on the node plane: ZeroMQ CURVE keys derived from the cluster token.

Every ZeroMQ socket of the fleet is encrypted and authenticated with CURVE. Two
key pairs are derived from the cluster token, one for the sockets that bind
(node control and KV sockets) and one for those that connect (control planes,
and prefill nodes sending KV). A connecting peer must know the server's public
key, which only token holders can derive, and the ZAP handler on each binding
socket admits only the fleet's client key. A process without the token cannot
complete the handshake, so it can neither send to a node nor pose as one.

Per-request secrets (``Reserve.secret``) add a second check inside the fleet: a
reservation's KV, first token and abort must present the secret the control
plane minted for it.
"""

import hashlib
import hmac
import logging
import secrets
from dataclasses import dataclass

import zmq
import zmq.auth.thread
from zmq.utils import z85

_LABEL = b"lightpd node plane v1"


@dataclass(frozen=True)
class FleetKeys:
    server_public: bytes
    server_secret: bytes
    client_public: bytes
    client_secret: bytes

    @classmethod
    def from_token(cls, cluster_token: str) -> "FleetKeys":
        if not cluster_token:
            raise ValueError("a cluster token is needed to join the node plane")

        def keypair(role: bytes) -> tuple[bytes, bytes]:
            seed = hmac.new(cluster_token.encode(), _LABEL + b" " + role, hashlib.sha256)
            secret = z85.encode(seed.digest())
            return zmq.curve_public(secret), secret

        server_public, server_secret = keypair(b"server")
        client_public, client_secret = keypair(b"client")
        return cls(server_public, server_secret, client_public, client_secret)

    def serve(self, sock: zmq.Socket) -> None:
        """Make ``sock`` (before bind) a CURVE server that only fleet members reach."""
        sock.curve_secretkey = self.server_secret
        sock.curve_publickey = self.server_public
        sock.curve_server = True

    def connect_as_member(self, sock: zmq.Socket) -> None:
        """Make ``sock`` (before connect) a CURVE client holding the fleet's keys."""
        sock.curve_secretkey = self.client_secret
        sock.curve_publickey = self.client_public
        sock.curve_serverkey = self.server_public


class _MembersOnly:
    def __init__(self, keys: FleetKeys) -> None:
        self.client_public = keys.client_public

    def callback(self, domain: str, key: bytes) -> bool:
        return hmac.compare_digest(key, self.client_public)  # z85, as pyzmq hands it over


def start_authenticator(ctx: zmq.Context, keys: FleetKeys) -> zmq.auth.thread.ThreadAuthenticator:
    """ZAP handler of ``ctx``: admits CURVE clients holding the fleet's client key."""
    auth = zmq.auth.thread.ThreadAuthenticator(ctx, log=logging.getLogger("lightpd.zap"))
    auth.start()
    auth.configure_curve_callback(domain="*", credentials_provider=_MembersOnly(keys))
    return auth


def new_secret() -> str:
    return secrets.token_hex(16)


def same_secret(presented: str, expected: str) -> bool:
    return hmac.compare_digest(presented.encode(), expected.encode())
