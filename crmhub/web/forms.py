"""`POST /f/{form}`: plain HTML forms posting straight to crmhub (no signature possible).

Browsers cannot sign, so a hosted form is guarded instead by an origin allow-list, a per-IP
rate limit, a honeypot field and size limits. Accepted posts go through the same durable
inbox as signed webhooks, then the browser is redirected to the thank-you page.
"""

from __future__ import annotations

import logging
import uuid
from datetime import UTC, datetime
from typing import Any
from urllib.parse import urlsplit

import orjson
from fastapi import APIRouter, BackgroundTasks, FastAPI, Request
from fastapi.responses import HTMLResponse, JSONResponse, RedirectResponse, Response
from starlette.datastructures import FormData
from starlette.exceptions import HTTPException
from starlette.formparsers import MultiPartException
from starlette.types import Message

from connectors.webform import WebformConfig
from crmhub.errors import CrmHubError
from crmhub.web.rate_limit import LocalRateLimiter, RateLimiter, RedisRateLimiter
from sync.intake import Intake, inline_connectors
from sync.intake_jobs import DrainQueue
from sync.jobs import queue_configured
from sync.sources import load_source

__all__ = [
    "BodyTooLarge",
    "after_accept",
    "drain_queue_of",
    "intake_of",
    "limiter_of",
    "problem",
    "read_body",
    "router",
    "webform",
]

log = logging.getLogger("crmhub.web.forms")
router = APIRouter(tags=["intake"])

FORM_TYPES = ("application/x-www-form-urlencoded", "multipart/form-data")
HOSTED_BODY_LIMIT = 65_536  # a contact form is a few hundred bytes; files are refused
MAX_FORM_FIELDS = 100


class BodyTooLarge(Exception):
    """The body passed the connector's `max_body_bytes`."""


def intake_of(app: FastAPI) -> Intake:
    """The app's intake, created on first use (tests may skip the lifespan)."""
    intake: Intake | None = getattr(app.state, "intake", None)
    if intake is None:
        settings = app.state.settings
        intake = Intake(settings, app.state.db, only=inline_connectors(settings))
        app.state.intake = intake
    return intake


def after_accept(app: FastAPI, background: BackgroundTasks, config: WebformConfig) -> None:
    """Start processing a delivery just accepted (it is in the inbox already).

    inline: wake the processor process when `crmhub serve` runs one, else process in this
    process after the response. worker: queue the worker's drain job after the response.
    drain: nothing; `crmhub forms drain` processes.
    """
    if config.process == "inline":
        processor = getattr(app.state, "processor", None)
        if processor is not None:
            processor.kick()
        else:
            background.add_task(intake_of(app).process_pending)
    elif config.process == "worker":
        background.add_task(drain_queue_of(app).kick)


def drain_queue_of(app: FastAPI) -> DrainQueue:
    queue: DrainQueue | None = getattr(app.state, "drain_queue", None)
    if queue is None:
        settings = app.state.settings
        if not queue_configured(settings):
            log.warning(
                'process = "worker" needs [queue] redis_url; trying the default Redis, and '
                "`crmhub forms drain` processes what no worker does"
            )
        queue = app.state.drain_queue = DrainQueue(settings)
    return queue


def limiter_of(app: FastAPI) -> RateLimiter:
    """The app's hosted-form rate limiter: shared through Redis when `[queue] redis_url` is
    set (every `crmhub serve` of the installation counts together), else this process's."""
    limiter: RateLimiter | None = getattr(app.state, "form_limiter", None)
    if limiter is None:
        settings = app.state.settings
        if queue_configured(settings):
            limiter = RedisRateLimiter(settings.queue.redis_url, settings.queue.namespace)
        else:
            limiter = LocalRateLimiter()
        app.state.form_limiter = limiter
    return limiter


def problem(status: int, detail: str, **headers: str) -> JSONResponse:
    return JSONResponse({"error": detail}, status_code=status, headers=headers or None)


def webform(request: Request, name: str) -> WebformConfig | None:
    """The enabled webform connector `name`, or None (answered as 404: no probing of config)."""
    table = request.app.state.settings.connectors.get(name)
    if not table or table.get("type") != "webform" or table.get("enabled") is False:
        return None
    # Validated once per app, not per request (a tenth of the intake's CPU); a changed
    # table is validated again.
    cache: dict[str, tuple[dict[str, Any], WebformConfig]] | None = getattr(
        request.app.state, "webforms", None
    )
    if cache is None:
        cache = request.app.state.webforms = {}
    cached = cache.get(name)
    if cached is not None and cached[0] == table:
        return cached[1]
    try:
        config = load_source(request.app.state.settings, name).config
    except CrmHubError:
        log.error("webform connector misconfigured", extra={"connector": name})
        return None
    if not isinstance(config, WebformConfig):
        return None
    cache[name] = (dict(table), config)
    return config


async def read_body(request: Request, limit: int) -> bytes:
    """The body, refused as soon as it passes `limit` (never buffered past it)."""
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise BodyTooLarge
    chunks: list[bytes] = []
    size = 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise BodyTooLarge
        chunks.append(chunk)
    return b"".join(chunks)


def media_type(request: Request) -> str:
    return request.headers.get("content-type", "").split(";", 1)[0].strip().lower()


def _origin_allowed(request: Request, allowed: list[str]) -> bool:
    if not allowed:
        return True
    origin = request.headers.get("origin")
    if not origin or origin == "null":
        referer = urlsplit(request.headers.get("referer", ""))
        origin = f"{referer.scheme}://{referer.netloc}" if referer.netloc else ""
    return origin.rstrip("/").lower() in {a.rstrip("/").lower() for a in allowed}


async def _parse_form(request: Request, body: bytes) -> FormData:
    sent = False

    async def replay() -> Message:
        nonlocal sent
        if sent:
            return {"type": "http.disconnect"}
        sent = True
        return {"type": "http.request", "body": body, "more_body": False}

    # A fresh Request over the bytes already read (and size-checked).
    return await Request(request.scope, replay).form(
        max_files=0, max_fields=MAX_FORM_FIELDS, max_part_size=HOSTED_BODY_LIMIT
    )


def _fields(form: FormData) -> dict[str, Any]:
    fields: dict[str, Any] = {}
    for key, value in form.multi_items():
        if not isinstance(value, str):
            continue
        if key in fields:  # checkboxes repeat their name
            previous = fields[key]
            fields[key] = [*previous, value] if isinstance(previous, list) else [previous, value]
        else:
            fields[key] = value
    return fields


def _thanks(config: WebformConfig) -> Response:
    if config.thank_you_url:
        return RedirectResponse(config.thank_you_url, status_code=303)
    return HTMLResponse("<!doctype html><title>Thank you</title><p>Thank you, we got it.</p>")


@router.post("/f/{form}", summary="Hosted HTML form intake")
async def hosted_form(form: str, request: Request, background: BackgroundTasks) -> Response:
    """Accept a plain HTML form post (urlencoded or multipart) for webform connector `form`.

    404 unknown form, 403 origin not allowed, 429 too many posts from this address, 415 not a
    form body, 413 too large, 400 unparsable; else a 303 to the thank-you URL.
    """
    config = webform(request, form)
    if config is None or not config.hosted:
        return problem(404, f"no hosted form named {form!r}")
    if not _origin_allowed(request, config.allowed_origins):
        origin = request.headers.get("origin") or "none"
        log.warning("form post from a foreign origin", extra={"connector": form, "origin": origin})
        return problem(403, "origin not allowed for this form")
    client = request.client.host if request.client else "unknown"
    wait = await limiter_of(request.app).allow(f"{form}|{client}", config.rate_limit)
    if wait is not None:
        return problem(
            429, "too many submissions; try again later", **{"Retry-After": f"{wait:.0f}"}
        )
    kind = media_type(request)
    if kind not in FORM_TYPES:
        return problem(415, f"expected {' or '.join(FORM_TYPES)}, got {kind or 'no content type'}")
    try:
        body = await read_body(request, min(config.max_body_bytes, HOSTED_BODY_LIMIT))
        parsed = await _parse_form(request, body)
    except BodyTooLarge:
        return problem(413, "form too large")
    except MultiPartException as exc:
        return problem(400, f"unreadable form: {exc.message}")
    except HTTPException as exc:  # Starlette's wrapping of MultiPartException inside an app
        return problem(400, f"unreadable form: {exc.detail}")
    fields = _fields(parsed)
    if fields.pop(config.honeypot, None):
        # Spam: answered exactly like a person, so the bot learns nothing; nothing is stored.
        log.info("honeypot filled; submission dropped", extra={"connector": form})
        return _thanks(config)
    now = datetime.now(UTC)
    submission_id = uuid.uuid4().hex
    payload: dict[str, Any] = {
        "submission_id": submission_id,
        "form": form,
        "submitted_at": now.isoformat(),
        "fields": fields,
    }
    intake = intake_of(request.app)
    await intake.accept(form, f"hosted:{submission_id}", kind, orjson.dumps(payload).decode())
    after_accept(request.app, background, config)
    return _thanks(config)
