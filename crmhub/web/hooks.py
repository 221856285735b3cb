"""`POST /hooks/forms/{connector}`: signed form webhooks (Typeform, Tally, Webflow, HubSpot,
generic), written to the durable inbox before the 2xx and processed right after it.

`router` also carries the hosted HTML form endpoint (crmhub/web/forms.py) and a lifespan that
drains deliveries a previous process acknowledged but did not finish.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import orjson
from fastapi import APIRouter, BackgroundTasks, FastAPI, Request
from fastapi.responses import JSONResponse, Response

from connectors.webform import delivery_id, verify
from crmhub.errors import AuthError
from crmhub.web.forms import (
    BodyTooLarge,
    after_accept,
    intake_of,
    media_type,
    problem,
    read_body,
    webform,
)
from crmhub.web.forms import router as forms_router
from sync.intake import JSON_TYPE, DrainReport
from sync.intake_process import Processor

__all__ = ["json_depth", "router"]

log = logging.getLogger("crmhub.web.hooks")


@asynccontextmanager
async def _lifespan(app: FastAPI) -> AsyncIterator[None]:
    intake = intake_of(app)
    processor: Processor | None = None
    drain: asyncio.Task[DrainReport] | None = None
    if getattr(app.state, "processing", "thread") == "process":
        # Its own process (sync/intake_process.py); it first drains what is pending.
        processor = app.state.processor = await asyncio.to_thread(Processor, app.state.settings)
    else:
        # Deliveries acknowledged before a crash or restart are still pending: finish them.
        drain = asyncio.create_task(intake.drain())
    try:
        yield
    finally:
        if processor is not None:
            app.state.processor = None
            await asyncio.to_thread(processor.close)
        if drain is not None and not drain.done():
            drain.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await drain
        intake.close()
        for name in ("form_limiter", "drain_queue"):  # their Redis connections
            held = getattr(app.state, name, None)
            if held is not None:
                setattr(app.state, name, None)
                await held.close()


router = APIRouter(tags=["intake"], lifespan=_lifespan)
router.include_router(forms_router)

_STRINGS = re.compile(rb'"(?:[^"\\]|\\.)*"')
_BRACKETS = re.compile(rb"[\[\]{}]")


def json_depth(body: bytes) -> int:
    """The deepest nesting of `body`, counted without parsing (strings skipped)."""
    depth = deepest = 0
    for match in _BRACKETS.finditer(_STRINGS.sub(b"", body)):
        if match.group() in (b"[", b"{"):
            depth += 1
            deepest = max(deepest, depth)
        else:
            depth -= 1
    return deepest


@router.post("/hooks/forms/{connector}", summary="Signed form webhook intake")
async def form_hook(connector: str, request: Request, background: BackgroundTasks) -> Response:
    """Accept one signed delivery for webform connector `connector`.

    404 unknown connector, 415 not JSON, 413 too large, 401 unsigned / bad signature / stale
    timestamp, 400 invalid or too deeply nested JSON. 200 `accepted` once the delivery is
    committed; 200 `duplicate` for a delivery id already received (not processed again).
    """
    config = webform(request, connector)
    if config is None or config.secret is None:
        return problem(404, f"no webhook connector named {connector!r}")
    kind = media_type(request)
    if kind != JSON_TYPE:
        return problem(415, f"expected {JSON_TYPE}, got {kind or 'no content type'}")
    try:
        body = await read_body(request, config.max_body_bytes)
    except BodyTooLarge:
        return problem(413, f"body larger than {config.max_body_bytes} bytes")
    try:
        verify(
            config,
            request.headers,
            body,
            method=request.method,
            url=str(request.url),
            now=time.time(),
        )
    except AuthError as exc:
        # Never the body: it is unauthenticated and full of personal data.
        client = request.client.host if request.client else "unknown"
        log.warning(
            "webhook rejected",
            extra={"connector": connector, "reason": exc.context.get("reason"), "client": client},
        )
        return problem(401, str(exc))
    depth = json_depth(body)
    if depth > config.max_json_depth:
        return problem(400, f"JSON nested {depth} deep; the limit is {config.max_json_depth}")
    try:
        payload: Any = orjson.loads(body)
    except orjson.JSONDecodeError as exc:
        return problem(400, f"invalid JSON: {exc}")
    if not isinstance(payload, dict):
        return problem(400, f"expected a JSON object, got {type(payload).__name__}")
    intake = intake_of(request.app)
    delivery = delivery_id(config.provider, payload, request.headers, body)
    accepted = await intake.accept(connector, delivery, JSON_TYPE, body.decode())
    if accepted.duplicate:
        log.info(
            "duplicate delivery", extra={"connector": connector, "inbox_id": accepted.inbox_id}
        )
        return JSONResponse({"status": "duplicate", "delivery": delivery})
    after_accept(request.app, background, config)
    return JSONResponse({"status": "accepted", "delivery": delivery})
