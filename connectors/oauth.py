"""OAuth2 refresh-token flow for the mail APIs (Gmail, Microsoft Graph).

`OAuthApiClient` is the shared `ApiClient` with a bearer token that refreshes itself: before
the token expires (its `expires_in`), and once when the API answers 401 (revoked early, clock
skew). A refresh token the identity provider refuses (`invalid_grant`) is an `AuthError`
naming the setting to fix; it is never retried. Vendors that signal throttling with 403
(Gmail's `rateLimitExceeded`) are mapped to `RateLimitedError` here, before the shared
error table would call them an auth problem.

`shared_refresh_token` keeps one `RefreshToken` per credential set for the life of the process,
so a worker that syncs a mailbox every few minutes reuses a valid access token instead of
asking the identity provider for a new one each run (IMAP XOAUTH2 uses this).
"""

from __future__ import annotations

import hashlib
import time
from collections.abc import Mapping
from typing import Any

import httpx

from connectors.http import ApiClient, error_for_response, parse_retry_after
from crmhub.errors import AuthError, PermanentError, RateLimitedError, TransientError

__all__ = ["OAuthApiClient", "RefreshToken", "shared_refresh_token"]

# Gmail's 403 reasons for throttling (its "Resolve errors" guide); `dailyLimitExceeded` (the
# project's daily quota) is not a credential problem either: retried with backoff.
_RATE_REASONS = (
    "ratelimitexceeded",
    "userratelimitexceeded",
    "dailylimitexceeded",
    "quotaexceeded",
    "toomanyrequests",
)
_EARLY = 60.0  # refresh this many seconds before expiry


class RefreshToken:
    """Trades a refresh token for access tokens at `token_url` (RFC 6749 section 6)."""

    def __init__(
        self,
        *,
        connector: str,
        token_url: str,
        client_id: str,
        client_secret: str | None,
        refresh_token: str,
        scope: str | None = None,
    ) -> None:
        self.connector = connector
        self.token_url = token_url
        self._form = {
            "grant_type": "refresh_token",
            "client_id": client_id,
            "refresh_token": refresh_token,
        }
        if client_secret:
            self._form["client_secret"] = client_secret
        if scope:
            self._form["scope"] = scope
        self._access: str | None = None
        self._expires = 0.0
        self.refreshes = 0

    def valid(self) -> str | None:
        if self._access and time.monotonic() < self._expires - _EARLY:
            return self._access
        return None

    def invalidate(self) -> None:
        """Forget the access token (the server refused it before its `expires_in`)."""
        self._access = None
        self._expires = 0.0

    async def refresh(self, client: httpx.AsyncClient) -> str:
        self.refreshes += 1
        try:
            response = await client.post(self.token_url, data=self._form)
        except httpx.HTTPError as exc:
            raise TransientError(
                f"{self.connector}: token refresh failed: {type(exc).__name__}",
                connector=self.connector,
            ) from None
        if response.status_code in (400, 401):
            code = _json(response).get("error", "")
            raise AuthError(
                f"{self.connector}: the identity provider refused the refresh token "
                f"({code or response.status_code}): check the 'refresh_token', 'client_id' and "
                f"'client_secret' settings of connector {self.connector!r}",
                connector=self.connector,
                status=response.status_code,
            )
        if response.status_code >= 500 or response.status_code == 429:
            raise TransientError(
                f"{self.connector}: token endpoint answered HTTP {response.status_code}",
                connector=self.connector,
                status=response.status_code,
            )
        body = _json(response)
        token = body.get("access_token")
        if response.status_code >= 400 or not isinstance(token, str):
            raise PermanentError(
                f"{self.connector}: token endpoint answered HTTP {response.status_code} "
                "without an access_token; check token_url",
                connector=self.connector,
            )
        self._access = token
        self._expires = time.monotonic() + float(body.get("expires_in") or 3600)
        return token


_SHARED: dict[str, RefreshToken] = {}


def shared_refresh_token(
    *,
    connector: str,
    token_url: str,
    client_id: str,
    client_secret: str | None,
    refresh_token: str,
    scope: str | None = None,
) -> RefreshToken:
    """The process's `RefreshToken` for these credentials (created on first use).

    Keyed by a hash of every field, so changed credentials get a new entry and the key
    itself reveals nothing. Access tokens only ever live in memory.
    """
    parts = (connector, token_url, client_id, client_secret or "", refresh_token, scope or "")
    key = hashlib.sha256("\0".join(parts).encode()).hexdigest()
    token = _SHARED.get(key)
    if token is None:
        token = _SHARED[key] = RefreshToken(
            connector=connector,
            token_url=token_url,
            client_id=client_id,
            client_secret=client_secret,
            refresh_token=refresh_token,
            scope=scope,
        )
    return token


def _json(response: httpx.Response) -> dict[str, Any]:
    try:
        body = response.json()
    except ValueError:
        return {}
    return body if isinstance(body, dict) else {}


def _rate_limited(response: httpx.Response) -> bool:
    if response.status_code == 429:
        return True
    if response.status_code != 403:
        return False
    error = _json(response).get("error")
    reasons: list[str] = []
    if isinstance(error, dict):
        for item in error.get("errors") or []:
            if isinstance(item, dict):
                reasons.append(str(item.get("reason", "")))
        reasons += [str(error.get("status", "")), str(error.get("code", ""))]
    return any(r.replace("_", "").lower() in _RATE_REASONS for r in reasons)


class OAuthApiClient(ApiClient):
    """`ApiClient` whose bearer token comes from a `RefreshToken` and renews itself."""

    def __init__(
        self, *, token: RefreshToken, extra_headers: Mapping[str, str] | None = None, **kwargs: Any
    ) -> None:
        super().__init__(headers={}, **kwargs)
        self.token = token
        self.extra_headers = dict(extra_headers or {})  # Graph's Prefer, for example

    async def _once(
        self,
        method: str,
        path: str,
        stream: str | None,
        params: Mapping[str, Any] | None,
        json_body: Any,
    ) -> Any:
        if self._client is None:
            raise RuntimeError("OAuthApiClient used outside session()")
        access = self.token.valid() or await self.token.refresh(self._client)
        response = await self._send(method, path, stream, params, json_body, access)
        if response.status_code == 401:
            # Expired or revoked early: one refresh, then the answer stands.
            access = await self.token.refresh(self._client)
            response = await self._send(method, path, stream, params, json_body, access)
        if _rate_limited(response):
            raise RateLimitedError(
                f"{self.connector}: {method} {httpx.URL(self.url(path)).path} -> HTTP "
                f"{response.status_code}: rate limited by the source",
                connector=self.connector,
                stream=stream,
                status=response.status_code,
                retry_after=parse_retry_after(response.headers.get("retry-after")),
            )
        error = error_for_response(
            response, connector=self.connector, stream=stream, secret=self._secret_name
        )
        if error is not None:
            raise error
        try:
            return response.json()
        except ValueError:
            raise TransientError(
                f"{self.connector}: {method} {path} returned a body that is not valid JSON",
                connector=self.connector,
                stream=stream,
            ) from None

    async def _send(
        self,
        method: str,
        path: str,
        stream: str | None,
        params: Mapping[str, Any] | None,
        json_body: Any,
        access: str,
    ) -> httpx.Response:
        assert self._client is not None
        if self._budget is not None:
            await self._budget.acquire()
        self.requests += 1
        try:
            return await self._client.request(
                method,
                self.url(path),
                params=params,
                json=json_body,
                headers={
                    **self.extra_headers,
                    "Authorization": f"Bearer {access}",
                    "Accept": "application/json",
                },
                timeout=self._timeout,
            )
        except httpx.HTTPError as exc:
            raise TransientError(
                f"{self.connector}: {method} {httpx.URL(self.url(path)).path} failed: "
                f"{type(exc).__name__}",
                connector=self.connector,
                stream=stream,
            ) from None
