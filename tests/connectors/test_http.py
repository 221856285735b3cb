"""connectors/http.py: error table, Retry-After, retry policy, auth helpers, rate budgets."""

from __future__ import annotations

import asyncio
import os
import time
import uuid
from datetime import UTC, datetime

import httpx
import pytest

from connectors.http import (
    ApiClient,
    LocalRateBudget,
    RedisRateBudget,
    basic_auth,
    error_for_response,
    mailchimp_base_url,
    parse_retry_after,
    request_retry,
)
from crmhub.errors import AuthError, PermanentError, RateLimitedError, TransientError

SECRET = "sk-canary-0123456789"


def response(
    status: int, headers: dict[str, str] | None = None, json: object = None
) -> httpx.Response:
    request = httpx.Request("GET", "https://api.example.com/v3/contacts?key=" + SECRET)
    return httpx.Response(status, headers=headers, json=json, request=request)


@pytest.mark.parametrize(
    ("status", "cls"),
    [
        (400, PermanentError),
        (401, AuthError),
        (403, AuthError),
        (404, PermanentError),
        (409, PermanentError),
        (429, RateLimitedError),
        (500, TransientError),
        (502, TransientError),
        (503, TransientError),
    ],
)
def test_error_table(status: int, cls: type[Exception]) -> None:
    error = error_for_response(response(status), connector="hs", stream="contacts")
    assert type(error) is cls
    assert SECRET not in str(error)
    assert error.attrs()["status"] == status  # type: ignore[union-attr]


def test_success_is_no_error() -> None:
    assert error_for_response(response(200), connector="hs", stream=None) is None


def test_auth_error_says_what_to_fix() -> None:
    error = error_for_response(
        response(401), connector="hs", stream="contacts", secret="the 'token' setting"
    )
    assert "the 'token' setting" in str(error)
    assert "expired or revoked" in str(error)


def test_vendor_detail_is_quoted() -> None:
    body = {"errors": [{"status": 401, "detail": "Missing or invalid private key."}]}
    error = error_for_response(response(401, json=body), connector="k", stream=None)
    assert "Missing or invalid private key." in str(error)


@pytest.mark.parametrize(
    ("body", "expected"),
    [
        (  # Microsoft Graph (docs: "Microsoft Graph error responses and resource types")
            {
                "error": {
                    "code": "ErrorAccessDenied",
                    "message": "Access is denied. Check credentials and try again.",
                    "innerError": {
                        "date": "2026-12-06T09:00:00",
                        "request-id": "b2f1c2d4-0000-4000-8000-1234567890ab",
                        "client-request-id": "b2f1c2d4-0000-4000-8000-1234567890ab",
                    },
                }
            },
            "(Access is denied. Check credentials and try again.; "
            "request-id b2f1c2d4-0000-4000-8000-1234567890ab)",
        ),
        (  # Google (Gmail API)
            {
                "error": {
                    "code": 403,
                    "message": "Request had insufficient authentication scopes.",
                    "errors": [{"reason": "insufficientPermissions"}],
                    "status": "PERMISSION_DENIED",
                }
            },
            "(Request had insufficient authentication scopes.)",
        ),
    ],
)
def test_nested_vendor_error_is_quoted(body: object, expected: str) -> None:
    error = error_for_response(response(403, json=body), connector="m", stream=None)
    assert str(error).endswith(expected)


@pytest.mark.parametrize(
    ("headers", "expected"),
    [
        ({"Retry-After": "7"}, 7.0),
        ({"Retry-After": "Wed, 01 Jan 2026 00:00:30 GMT"}, 30.0),
        ({"RateLimit-Reset": "3"}, 3.0),
        ({"X-HubSpot-RateLimit-Interval-Milliseconds": "10000"}, 10.0),
        ({}, None),
    ],
)
def test_retry_after_sources(headers: dict[str, str], expected: float | None) -> None:
    now = datetime(2026, 1, 1, tzinfo=UTC)
    if "Retry-After" in headers and "GMT" in headers["Retry-After"]:
        assert parse_retry_after(headers["Retry-After"], now=now) == expected
        return
    error = error_for_response(response(429, headers), connector="x", stream=None)
    assert isinstance(error, RateLimitedError)
    assert error.retry_after == expected  # type: ignore[attr-defined]


def test_garbage_retry_after_is_ignored() -> None:
    assert parse_retry_after("soon") is None
    assert parse_retry_after("-5") == 0.0


def test_auth_helpers() -> None:
    assert basic_auth("key-us19")["Authorization"] == "Basic Y3JtaHViOmtleS11czE5"
    assert mailchimp_base_url("abc123-us19") == "https://us19.api.mailchimp.com/3.0"
    with pytest.raises(ValueError, match="datacenter"):
        mailchimp_base_url("nodatacenter")


def api_for(handler: httpx.MockTransport, sleeps: list[float]) -> ApiClient:
    async def fake_sleep(seconds: float) -> None:
        sleeps.append(seconds)

    return ApiClient(
        connector="t",
        base_url="https://api.example.com",
        headers={"Authorization": f"Bearer {SECRET}"},
        client=httpx.AsyncClient(transport=handler),
        retry=lambda: request_retry(sleep=fake_sleep),
    )


async def test_retry_waits_retry_after_then_succeeds() -> None:
    calls = []

    def handler(request: httpx.Request) -> httpx.Response:
        calls.append(request)
        if len(calls) < 3:
            return httpx.Response(429, headers={"Retry-After": "4"})
        return httpx.Response(200, json={"ok": True})

    sleeps: list[float] = []
    api = api_for(httpx.MockTransport(handler), sleeps)
    assert await api.request_json("GET", "/x") == {"ok": True}
    assert sleeps == [4.0, 4.0]


async def test_retry_is_bounded_and_backs_off() -> None:
    sleeps: list[float] = []
    api = api_for(httpx.MockTransport(lambda r: httpx.Response(502)), sleeps)
    with pytest.raises(TransientError, match="502"):
        await api.request_json("GET", "/x")
    assert len(sleeps) == 4  # five attempts
    assert sleeps[-1] > sleeps[0]
    assert max(sleeps) <= 20.5


async def test_long_retry_after_is_left_to_the_queue() -> None:
    sleeps: list[float] = []
    api = api_for(
        httpx.MockTransport(lambda r: httpx.Response(429, headers={"Retry-After": "3600"})),
        sleeps,
    )
    with pytest.raises(RateLimitedError) as info:
        await api.request_json("GET", "/x")
    assert sleeps == []
    assert info.value.retry_after == 3600  # type: ignore[attr-defined]


async def test_permanent_errors_are_not_retried() -> None:
    calls: list[int] = []

    def handler(request: httpx.Request) -> httpx.Response:
        calls.append(1)
        return httpx.Response(401, json={"message": "bad token"})

    sleeps: list[float] = []
    with pytest.raises(AuthError):
        await api_for(httpx.MockTransport(handler), sleeps).request_json("GET", "/x")
    assert calls == [1]


async def test_transport_errors_are_transient_and_secret_free() -> None:
    def handler(request: httpx.Request) -> httpx.Response:
        raise httpx.ConnectError(f"refused {request.url}")

    sleeps: list[float] = []
    with pytest.raises(TransientError) as info:
        await api_for(httpx.MockTransport(handler), sleeps).request_json(
            "GET", "/x", params={"k": SECRET}
        )
    assert SECRET not in str(info.value)
    assert len(sleeps) == 4


async def test_html_body_is_a_permanent_error() -> None:
    def handler(request: httpx.Request) -> httpx.Response:
        return httpx.Response(200, text="<html>login</html>", headers={"content-type": "text/html"})

    with pytest.raises(PermanentError, match="base_url"):
        await api_for(httpx.MockTransport(handler), []).request_json("GET", "/x")


async def test_local_budget_paces_requests() -> None:
    budget = LocalRateBudget(rate=50, burst=5)
    started = time.monotonic()
    await asyncio.gather(*(budget.acquire() for _ in range(30)))
    elapsed = time.monotonic() - started
    # 5 from the burst, 25 more at 50/s: about half a second.
    assert 0.4 <= elapsed < 1.5


def redis_url() -> str:
    return os.environ.get("CRMHUB_TEST_REDIS", "redis://127.0.0.1:6379/15")


@pytest.mark.redis
async def test_redis_budget_is_shared_between_clients() -> None:
    from redis.asyncio import Redis

    client = Redis.from_url(redis_url())
    try:
        await client.ping()
    except Exception as exc:
        await client.aclose()
        if os.environ.get("CI") == "true":
            pytest.fail(f"Redis is required under CI=true: {exc}")
        pytest.skip(f"no Redis at {redis_url()}: {exc}")
    key = f"crmhub-test:{uuid.uuid4().hex}"
    a = RedisRateBudget(redis_url(), key, rate=40, burst=4)
    b = RedisRateBudget(redis_url(), key, rate=40, burst=4)
    try:
        started = time.monotonic()
        await asyncio.gather(*(x.acquire() for x in [a, b] * 12))
        elapsed = time.monotonic() - started
        # 24 requests share one 40/s bucket with 4 saved: at least 0.5 s, whichever client.
        assert elapsed >= 0.45
        assert await client.exists(key) == 1
    finally:
        await client.delete(key)
        await a.aclose()
        await b.aclose()
        await client.aclose()
