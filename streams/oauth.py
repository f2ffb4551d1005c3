"""OAUTHBEARER tokens for the worker's aiokafka clients: the OIDC client-credentials grant.

librdkafka (the sink, robots, publishers) fetches its own tokens (``sasl.oauthbearer.method=oidc``,
:meth:`Settings.kafka_config`); aiokafka needs a token provider, and this is one with the same
settings: ``kafka_oauth_token_url``, ``kafka_oauth_client_id``, ``kafka_oauth_client_secret``,
``kafka_oauth_scope``.
"""

from __future__ import annotations

import time

import httpx
from aiokafka.abc import AbstractTokenProvider

from labloop.schemas import LabloopError
from labloop.streams.settings import Settings

__all__ = ["ClientCredentialsTokens", "OAuthError"]


class OAuthError(LabloopError):
    """The token endpoint refused the client or answered without a token."""


class ClientCredentialsTokens(AbstractTokenProvider):  # type: ignore[misc]
    """Access tokens from ``token_url``, cached until a minute before they expire.

    Raises:
        OAuthError: from :meth:`token`, when the endpoint refuses (the secret is never in the message).
    """

    def __init__(self, token_url: str, client_id: str, client_secret: str, scope: str | None = None,
                 timeout_s: float = 10.0) -> None:
        self.token_url, self.client_id, self.scope, self.timeout_s = token_url, client_id, scope, timeout_s
        self._secret = client_secret
        self._token = ""
        self._expires = 0.0

    @classmethod
    def from_settings(cls, s: Settings) -> ClientCredentialsTokens:
        if not (s.kafka_oauth_token_url and s.kafka_oauth_client_id and s.kafka_oauth_client_secret):
            raise OAuthError("OAUTHBEARER needs LABLOOP_KAFKA_OAUTH_TOKEN_URL, _CLIENT_ID and _CLIENT_SECRET")
        return cls(s.kafka_oauth_token_url, s.kafka_oauth_client_id, s.kafka_oauth_client_secret.get_secret_value(),
                   s.kafka_oauth_scope)

    async def token(self) -> str:
        if self._token and time.time() < self._expires - 60:
            return self._token
        data = {"grant_type": "client_credentials", **({"scope": self.scope} if self.scope else {})}
        async with httpx.AsyncClient(timeout=self.timeout_s) as client:
            resp = await client.post(self.token_url, data=data, auth=(self.client_id, self._secret))
        if resp.status_code != 200:
            raise OAuthError(f"token endpoint {self.token_url} answered HTTP {resp.status_code} for client {self.client_id}")
        body = resp.json()
        if "access_token" not in body:
            raise OAuthError(f"token endpoint {self.token_url} answered without an access_token")
        self._token = str(body["access_token"])
        self._expires = time.time() + float(body.get("expires_in", 300))
        return self._token
