"""HTTP plumbing shared by every API connector: errors, retries, auth, rate budgets.

One table turns a response into an error (`ERROR_TABLE`, the airbyte error-mapping idea):

| status            | error               | retried here |
|-------------------|---------------------|--------------|
| 429               | `RateLimitedError`  | yes, waits `Retry-After` or the vendor's reset header |
| 500-599           | `TransientError`    | yes, jittered exponential backoff |
| timeout/transport | `TransientError`    | yes |
| 401, 403          | `AuthError`         | no: the message says which credential to fix |
| other 4xx         | `PermanentError`    | no |
| 2xx, bad JSON     | `TransientError`    | yes: a truncated body is usually a dropped link |

Retries are one request deep and seconds long (`request_retry`); the job queue retries whole
runs for minutes. Before every attempt the request takes a token from the account's
`RateBudget`, so a full sync paces itself under the vendor's documented limit instead of
learning it from 429s. The budget is per process by default and shared through Redis
(`RedisRateBudget`) when workers on several machines talk to one account.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import email.utils
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, ClassVar, Literal, Protocol, TypeVar

import httpx
import orjson
from pydantic import Field
from tenacity import (
    AsyncRetrying,
    RetryCallState,
    before_sleep_log,
    retry_if_exception,
    stop_after_attempt,
    stop_after_delay,
    wait_exponential,
    wait_random,
)

from connectors.base import Connector, FullScanConfig, Recipient, WriteBackConfig
from crmhub.errors import (
    AuthError,
    ConnectorError,
    PermanentError,
    RateLimitedError,
    TransientError,
)

__all__ = [
    "ERROR_TABLE",
    "ApiClient",
    "HttpConnector",
    "HttpConnectorConfig",
    "LocalRateBudget",
    "RateBudget",
    "RedisRateBudget",
    "basic_auth",
    "bearer_auth",
    "error_for_response",
    "header_auth",
    "mailchimp_base_url",
    "parse_retry_after",
    "rate_budget_for",
    "request_retry",
    "require_email",
    "tolerate_missing",
]

log = logging.getLogger(__name__)

DEFAULT_TIMEOUT = httpx.Timeout(30.0, connect=10.0)
MAX_RETRY_AFTER = 60.0
"""A Retry-After longer than this is not waited out in-request: the job queue defers instead."""

# status -> (error class, what the operator should do). 401/403 name the credential field.
ERROR_TABLE: dict[int, tuple[type[ConnectorError], str]] = {
    400: (PermanentError, "the request was refused as invalid"),
    401: (AuthError, "the credentials were refused: check {secret} (expired or revoked?)"),
    403: (
        AuthError,
        "access denied: {secret} lacks a scope or permission this connector needs, "
        "or base_url points at the wrong account",
    ),
    404: (PermanentError, "not found: check base_url and the configured ids"),
    429: (RateLimitedError, "rate limited by the source"),
}


def parse_retry_after(value: str | None, *, now: datetime | None = None) -> float | None:
    """Seconds to wait from a `Retry-After` header (delta-seconds or HTTP-date), or None."""
    if value is None or not value.strip():
        return None
    value = value.strip()
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    if when.tzinfo is None:
        when = when.replace(tzinfo=UTC)
    return max(0.0, (when - (now or datetime.now(UTC))).total_seconds())


def _retry_after(response: httpx.Response) -> float | None:
    headers = response.headers
    seconds = parse_retry_after(headers.get("retry-after"))
    if seconds is None and "ratelimit-reset" in headers:  # Klaviyo, IETF draft
        seconds = parse_retry_after(headers["ratelimit-reset"])
    if seconds is None and "x-hubspot-ratelimit-interval-milliseconds" in headers:
        # HubSpot does not promise Retry-After; the rolling window is the upper bound.
        with contextlib.suppress(ValueError):
            seconds = float(headers["x-hubspot-ratelimit-interval-milliseconds"]) / 1000
    return seconds


def _detail(response: httpx.Response) -> str:
    """A short, secret-free description of an error body (vendor title/detail/message)."""
    try:
        body = response.json()
    except ValueError:
        return ""
    if not isinstance(body, dict):
        return ""
    request_id = ""
    if isinstance(body.get("error"), dict):
        # Google and Microsoft Graph: {"error": {"code", "message", ...}}; Graph's
        # innerError carries the request id its support asks for.
        body = body["error"]
        inner = body.get("innerError")
        if isinstance(inner, dict) and isinstance(inner.get("request-id"), str):
            request_id = f"; request-id {inner['request-id'][:64]}"
    places = [body]  # the body's own words first, then its first listed error (JSON:API)
    errors = body.get("errors")
    if isinstance(errors, list) and errors and isinstance(errors[0], dict):
        places.append(errors[0])
    for place in places:
        for key in ("detail", "message", "title", "error"):
            value = place.get(key)
            if isinstance(value, str) and value:
                return value[:200] + request_id
    return ""


def error_for_response(
    response: httpx.Response, *, connector: str, stream: str | None, secret: str = "the token"
) -> ConnectorError | None:
    """The error a response stands for, or None for a success. Never includes secrets."""
    status = response.status_code
    if status < 400:
        return None
    what = f"{response.request.method} {response.request.url.path}"
    if status in ERROR_TABLE:
        cls, hint = ERROR_TABLE[status]
    elif status >= 500:
        cls, hint = TransientError, "the source had a server error"
    else:
        cls, hint = PermanentError, "the request was refused"
    detail = _detail(response)
    message = f"{connector}: {what} -> HTTP {status}: {hint.format(secret=secret)}"
    if detail:
        message += f" ({detail})"
    context: dict[str, Any] = {"connector": connector, "stream": stream, "status": status}
    if cls is RateLimitedError:
        context["retry_after"] = _retry_after(response)
    return cls(message, **context)


# -- retries ----------------------------------------------------------------------------


def _wait(base: Callable[[RetryCallState], float]) -> Callable[[RetryCallState], float]:
    """Honour the server's Retry-After when it gave one, else the jittered backoff."""

    def wait(state: RetryCallState) -> float:
        exc = state.outcome.exception() if state.outcome else None
        retry_after = getattr(exc, "retry_after", None)
        if isinstance(exc, RateLimitedError) and retry_after is not None:
            return float(min(retry_after, MAX_RETRY_AFTER))
        return base(state)

    return wait


def _retryable(exc: BaseException) -> bool:
    if not isinstance(exc, TransientError):
        return False
    retry_after = getattr(exc, "retry_after", None)
    # A server asking for minutes is the queue's job (arq defer), not an in-request sleep.
    return retry_after is None or retry_after <= MAX_RETRY_AFTER


def request_retry(
    *,
    attempts: int = 5,
    max_delay: float = 120.0,
    initial: float = 0.5,
    max_wait: float = 20.0,
    sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
) -> AsyncRetrying:
    """The one retry policy for a single request: transient errors, bounded in tries and time."""
    return AsyncRetrying(
        retry=retry_if_exception(_retryable),
        wait=_wait(wait_exponential(multiplier=initial, max=max_wait) + wait_random(0, initial)),
        stop=stop_after_attempt(attempts) | stop_after_delay(max_delay),
        sleep=sleep,
        reraise=True,
        before_sleep=before_sleep_log(log, logging.INFO),
    )


# -- auth -------------------------------------------------------------------------------


def bearer_auth(token: str) -> dict[str, str]:
    """`Authorization: Bearer <token>` (HubSpot private apps, OAuth)."""
    return {"Authorization": f"Bearer {token}"}


def header_auth(name: str, token: str, *, prefix: str = "") -> dict[str, str]:
    """An API key in a header: `Api-Token: k` or `Authorization: Klaviyo-API-Key k`."""
    return {name: f"{prefix} {token}".strip()}


def basic_auth(password: str, *, username: str = "crmhub") -> dict[str, str]:
    """HTTP Basic; Mailchimp takes any user name and the API key as password."""
    raw = base64.b64encode(f"{username}:{password}".encode()).decode("ascii")
    return {"Authorization": f"Basic {raw}"}


def mailchimp_base_url(api_key: str) -> str:
    """`https://<dc>.api.mailchimp.com/3.0` from a key ending in `-<dc>` (e.g. `-us19`)."""
    _, sep, dc = api_key.rpartition("-")
    if not sep or not dc.isalnum():
        raise ValueError("a Mailchimp API key ends in -<datacenter> (e.g. -us19); set base_url")
    return f"https://{dc}.api.mailchimp.com/3.0"


# -- rate budgets -----------------------------------------------------------------------


class RateBudget(Protocol):
    """Requests per second an account may spend, shared by everything that talks to it."""

    async def acquire(self) -> None:
        """Wait until one request may be sent."""
        ...


@dataclass
class LocalRateBudget:
    """An in-process token bucket: `rate` tokens per second, up to `burst` saved up."""

    rate: float
    burst: float
    clock: Callable[[], float] = time.monotonic
    _tokens: float = field(init=False)
    _stamp: float = field(init=False)
    _lock: asyncio.Lock = field(init=False, default_factory=asyncio.Lock)

    def __post_init__(self) -> None:
        self._tokens = self.burst
        self._stamp = self.clock()

    def _take(self) -> float:
        now = self.clock()
        self._tokens = min(self.burst, self._tokens + (now - self._stamp) * self.rate)
        self._stamp = now
        if self._tokens >= 1:
            self._tokens -= 1
            return 0.0
        return (1 - self._tokens) / self.rate

    async def acquire(self) -> None:
        async with self._lock:
            delay = self._take()
            while delay > 0:
                await asyncio.sleep(delay)
                delay = self._take()


# Atomic refill-and-take on a Redis hash; returns milliseconds to wait (0 = granted).
# The clock is read inside the script: a time read in an earlier round trip can be older
# than the stamp another client just wrote, and the bucket would refill twice.
_BUCKET_LUA = """
local rate = tonumber(ARGV[1])
local burst = tonumber(ARGV[2])
local clock = redis.call('TIME')
local now = tonumber(clock[1]) * 1000 + math.floor(tonumber(clock[2]) / 1000)
local state = redis.call('HMGET', KEYS[1], 'tokens', 'stamp')
local tokens = tonumber(state[1]) or burst
local stamp = tonumber(state[2]) or now
tokens = math.min(burst, tokens + math.max(0, now - stamp) * rate / 1000)
local wait = 0
if tokens >= 1 then tokens = tokens - 1 else wait = math.ceil((1 - tokens) * 1000 / rate) end
redis.call('HSET', KEYS[1], 'tokens', tokens, 'stamp', now)
redis.call('PEXPIRE', KEYS[1], math.ceil(burst * 1000 / rate) + 60000)
return wait
"""


@dataclass
class RedisRateBudget:
    """A token bucket kept in Redis under `key`, so every worker shares one account's limit.

    The clock is the Redis server's (`TIME`), so workers with skewed clocks still agree.
    """

    redis_url: str
    key: str
    rate: float
    burst: float
    _redis: Any = field(init=False, default=None)
    _script: Any = field(init=False, default=None)

    async def acquire(self) -> None:
        if self._redis is None:
            from redis.asyncio import Redis

            self._redis = Redis.from_url(self.redis_url)
            self._script = self._redis.register_script(_BUCKET_LUA)
        while True:
            wait_ms = int(await self._script(keys=[self.key], args=[self.rate, self.burst]))
            if wait_ms <= 0:
                return
            await asyncio.sleep(wait_ms / 1000)

    async def aclose(self) -> None:
        if self._redis is not None:
            await self._redis.aclose()
            self._redis = None


_LOCAL_BUDGETS: dict[str, LocalRateBudget] = {}


def rate_budget_for(
    account: str, *, rate: float, burst: float | None = None, redis_url: str | None = None
) -> RateBudget:
    """The budget for `account` ("hubspot:<host>" ...): Redis-shared if a URL is given.

    The default burst of one request keeps pacing even: a vendor counting requests in any
    sliding one-second window then never sees more than `rate` of them.
    """
    burst = burst if burst is not None else 1.0
    if redis_url:
        return RedisRateBudget(redis_url, f"crmhub:ratelimit:{account}", rate, burst)
    budget = _LOCAL_BUDGETS.get(account)
    if budget is None or budget.rate != rate or budget.burst != burst:
        budget = _LOCAL_BUDGETS[account] = LocalRateBudget(rate, burst)
    return budget


# -- the client a connector talks through -----------------------------------------------


class ApiClient:
    """One vendor account: base URL, auth headers, rate budget, retry policy, error table.

    Borrows the engine's shared `httpx.AsyncClient`; when there is none (tests, scripts) it
    opens its own inside `session()` and closes it afterwards.
    """

    def __init__(
        self,
        *,
        connector: str,
        base_url: str,
        headers: Mapping[str, str],
        budget: RateBudget | None = None,
        client: httpx.AsyncClient | None = None,
        secret_name: str = "the token",
        retry: Callable[[], AsyncRetrying] | None = None,
        timeout: httpx.Timeout = DEFAULT_TIMEOUT,
    ) -> None:
        self.connector = connector
        self.base_url = base_url.rstrip("/")
        self._headers = dict(headers)
        self._budget = budget
        self._shared = client
        self._client: httpx.AsyncClient | None = client
        self._secret_name = secret_name
        self._retry = retry
        self._timeout = timeout
        self.requests = 0

    @contextlib.asynccontextmanager
    async def session(self) -> AsyncIterator[ApiClient]:
        try:
            if self._shared is not None:
                yield self
                return
            async with httpx.AsyncClient(timeout=self._timeout) as own:
                self._client = own
                try:
                    yield self
                finally:
                    self._client = None
        finally:
            close = getattr(self._budget, "aclose", None)
            if close is not None:  # a Redis budget holds a connection pool
                await close()

    def url(self, path: str) -> str:
        return path if path.startswith(("http://", "https://")) else self.base_url + path

    async def request_json(
        self,
        method: str,
        path: str,
        *,
        stream: str | None = None,
        params: Mapping[str, Any] | None = None,
        json_body: Any = None,
    ) -> Any:
        """Send one request with retries; return the decoded JSON body or raise an error."""
        policy = self._retry() if self._retry is not None else request_retry()
        async for attempt in policy:
            with attempt:
                return await self._once(method, path, stream, params, json_body)
        raise AssertionError("unreachable")  # pragma: no cover

    async def _once(
        self,
        method: str,
        path: str,
        stream: str | None,
        params: Mapping[str, Any] | None,
        json_body: Any,
    ) -> Any:
        if self._client is None:
            raise RuntimeError("ApiClient used outside session()")
        if self._budget is not None:
            await self._budget.acquire()
        self.requests += 1
        try:
            response = await self._client.request(
                method,
                self.url(path),
                params=dict(params) if params else None,
                json=json_body,
                headers=self._headers,
                timeout=self._timeout,
            )
        except httpx.TimeoutException as exc:
            raise TransientError(
                f"{self.connector}: {method} {path} timed out ({type(exc).__name__})",
                connector=self.connector,
                stream=stream,
            ) from None
        except httpx.TransportError as exc:
            raise TransientError(
                f"{self.connector}: {method} {path} failed: {type(exc).__name__}",
                connector=self.connector,
                stream=stream,
            ) from None
        error = error_for_response(
            response, connector=self.connector, stream=stream, secret=self._secret_name
        )
        if error is not None:
            raise error
        if response.status_code == 204 or (response.status_code == 202 and not response.content):
            return None  # write endpoints that answer with no body
        try:
            return _decode(response)
        except (ValueError, UnicodeDecodeError):
            kind = response.headers.get("content-type", "unknown content type")
            cls = PermanentError if kind.startswith("text/html") else TransientError
            raise cls(
                f"{self.connector}: {method} {path} returned a body that is not valid JSON "
                f"({kind}, {len(response.content)} bytes); "
                + ("is base_url an API address?" if cls is PermanentError else "truncated?"),
                connector=self.connector,
                stream=stream,
            ) from None


def _decode(response: httpx.Response) -> Any:
    """The JSON body: orjson on the raw bytes (JSON is UTF-8; several times faster than
    `response.json()`), falling back to httpx's charset detection for anything else."""
    try:
        return orjson.loads(response.content)
    except orjson.JSONDecodeError:
        return response.json()


# -- the base of every API connector ----------------------------------------------------


class HttpConnectorConfig(FullScanConfig):
    """Options shared by the HTTP API connectors (each adds its secret and ids). A `--full`
    run lists every contact, so deletions are inferred from it (`max_delete_ratio`)."""

    base_url: str | None = Field(
        None, description="API root; the vendor's by default (sandboxes, proxies, test servers)"
    )
    rate_limit: float | None = Field(
        None, gt=0, description="requests/second budget for the account (vendor's documented)"
    )
    rate_budget: Literal["local", "redis"] = Field(
        "local", description="redis: share the budget with every worker ([queue].redis_url)"
    )
    page_size: int | None = Field(None, ge=1, description="records per request (vendor max)")
    timeout: float = Field(30.0, gt=0, description="seconds per request")
    writeback: WriteBackConfig = Field(
        default_factory=WriteBackConfig,
        description="what crmhub may push to this tool (docs/connectors.md, Write-back)",
    )


HttpConfigT = TypeVar("HttpConfigT", bound=HttpConnectorConfig)


class HttpConnector(Connector[HttpConfigT]):
    """An API connector: builds its `ApiClient` from config; subclasses set the class vars."""

    default_base_url: ClassVar[str] = ""
    default_rate: ClassVar[float] = 5.0
    max_page_size: ClassVar[int] = 100
    secret_name: ClassVar[str] = "token"
    joins_pages: ClassVar[bool] = True  # the vendor sizes the pages, not the user

    @property
    def page_size(self) -> int:
        return min(self.config.page_size or self.max_page_size, self.max_page_size)

    def base_url(self) -> str:
        return self.config.base_url or self.default_base_url

    def auth_headers(self) -> dict[str, str]:
        raise NotImplementedError

    def api(self) -> ApiClient:
        base = self.base_url()
        host = httpx.URL(base).host or base
        redis_url = None
        if self.config.rate_budget == "redis":
            extras = self.context.extras or {}
            redis_url = extras.get("redis_url") or (
                self.context.settings.queue.redis_url if self.context.settings else None
            )
        budget = rate_budget_for(
            f"{self.kind}:{host}:{self.account_key()}",
            rate=self.config.rate_limit or self.default_rate,
            redis_url=redis_url,
        )
        return ApiClient(
            connector=self.name,
            base_url=base,
            headers=self.auth_headers(),
            budget=budget,
            client=self.context.client,
            secret_name=f"the {self.secret_name!r} setting of connector {self.name!r}",
            timeout=httpx.Timeout(self.config.timeout, connect=min(10.0, self.config.timeout)),
        )

    def account_key(self) -> str:
        """What identifies the vendor account for rate limits (not the secret itself)."""
        return ""


# -- write-back helpers -----------------------------------------------------------------


def require_email(connector: str, who: Recipient) -> str:
    """The recipient's email, or a PermanentError: this vendor addresses people by email."""
    if not who.email:
        raise PermanentError(
            f"{connector}: cannot write back without an email address for the person",
            connector=connector,
            stream="writeback",
        )
    return who.email


async def tolerate_missing(call: Awaitable[Any]) -> bool:
    """Await `call`; a 404 means the person is already gone (fine for an erasure): False."""
    try:
        await call
    except PermanentError as exc:
        if exc.context.get("status") == 404:
            return False
        raise
    return True
