"""The hosted-form rate limit: posts per minute per form and client address.

One `crmhub serve` keeps the count in its own memory (`LocalRateLimiter`). Several of them
behind a load balancer (replicas on one PostgreSQL store) would each allow the full rate, so
when `[queue] redis_url` is set the count lives in Redis (`RedisRateLimiter`), shared by every
process of the installation. If Redis cannot be reached, the process falls back to its own
count for that post: a form keeps working, at most N times the limit with N processes.
"""

from __future__ import annotations

import hashlib
import logging
import time
import uuid
from collections import OrderedDict, deque
from typing import Protocol

from redis.asyncio import Redis
from redis.exceptions import RedisError

__all__ = ["LocalRateLimiter", "RateLimiter", "RedisRateLimiter"]

log = logging.getLogger("crmhub.web.forms")

WINDOW = 60.0  # seconds: the limit is "per minute"


class RateLimiter(Protocol):
    async def allow(self, key: str, per_minute: int) -> float | None:
        """None when this post is allowed (and counted); else seconds until one would be."""

    async def close(self) -> None: ...


class LocalRateLimiter:
    """Sliding one-minute window per key, in this process's memory."""

    def __init__(self, max_keys: int = 10_000) -> None:
        self._hits: OrderedDict[str, deque[float]] = OrderedDict()
        self._max_keys = max_keys

    async def allow(self, key: str, per_minute: int) -> float | None:
        return self.allow_at(key, per_minute, time.monotonic())

    def allow_at(self, key: str, per_minute: int, now: float) -> float | None:
        hits = self._hits.pop(key, None) or deque()
        while hits and hits[0] <= now - WINDOW:
            hits.popleft()
        self._hits[key] = hits  # most recent last: the oldest keys are evicted first
        if len(self._hits) > self._max_keys:
            self._hits.popitem(last=False)
        if len(hits) >= per_minute:
            return max(1.0, WINDOW - (now - hits[0]))
        hits.append(now)
        return None

    async def close(self) -> None:
        return None


# Atomic in Redis, on Redis's clock (the processes' own clocks may disagree): drop hits older
# than the window, then count and add this one, or say how long until one would be allowed.
_SLIDING_WINDOW = """
local key, window, limit, member = KEYS[1], tonumber(ARGV[1]), tonumber(ARGV[2]), ARGV[3]
local clock = redis.call('TIME')
local now = tonumber(clock[1]) + tonumber(clock[2]) / 1000000
redis.call('ZREMRANGEBYSCORE', key, '-inf', now - window)
if redis.call('ZCARD', key) >= limit then
    local oldest = redis.call('ZRANGE', key, 0, 0, 'WITHSCORES')
    return tostring(window - (now - tonumber(oldest[2])))
end
redis.call('ZADD', key, now, member)
redis.call('PEXPIRE', key, math.ceil(window * 1000))
return false
"""


class RedisRateLimiter:
    """The same sliding window, one sorted set per key in Redis, shared by every process.

    Keys hold a digest of the form and client address, never the address itself.
    """

    def __init__(self, url: str, prefix: str, timeout: float = 0.25) -> None:
        self._redis = Redis.from_url(
            url, socket_timeout=timeout, socket_connect_timeout=timeout, retry_on_timeout=False
        )
        self._script = self._redis.register_script(_SLIDING_WINDOW)
        self._prefix = prefix
        self._fallback = LocalRateLimiter()
        self._warned_at = 0.0

    def redis_key(self, key: str) -> str:
        digest = hashlib.sha256(key.encode()).hexdigest()[:32]
        return f"{self._prefix}forms:rate:{digest}"

    async def allow(self, key: str, per_minute: int) -> float | None:
        try:
            wait = await self._script(
                keys=[self.redis_key(key)], args=[WINDOW, per_minute, uuid.uuid4().hex]
            )
        except (RedisError, OSError) as exc:
            if time.monotonic() - self._warned_at > WINDOW:  # once a minute, not per post
                self._warned_at = time.monotonic()
                log.warning(
                    "form rate limit: Redis unreachable, counting in this process",
                    extra={"error_type": type(exc).__name__},
                )
            return await self._fallback.allow(key, per_minute)
        return None if wait is None else max(1.0, float(wait))

    async def close(self) -> None:
        await self._redis.aclose()
