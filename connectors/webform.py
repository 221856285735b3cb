"""Web forms: deliveries pushed by form tools (Typeform, Tally, Webflow, HubSpot, any signed
webhook) and by plain HTML forms posting to crmhub's hosted endpoint.

Intake is push: `crmhub.web` verifies and stores each delivery (sync/intake.py) and this module
only knows the providers: how a delivery is signed (`verify`), what identifies it
(`delivery_id`) and how its payload becomes one flat submission (`normalise`), which the
provider's mapping (`mappings/webform_<provider>.toml`) turns into a contact and a
`form_submission` activity. `pull` yields nothing: there is nothing to fetch.

The normalised submission every mapping reads::

    {"submission_id": "...", "provider": "typeform", "form": "Contact us", "form_id": "...",
     "submitted_at": "2026-03-01T10:00:00+00:00",
     "fields": {"email": "...", "first_name": "...", ...},   # every answer, key slugged
     "typed": {"email": "...", "phone": "..."}}               # answers the provider typed
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import re
from collections.abc import AsyncIterator, Mapping
from datetime import UTC, datetime
from typing import Any, ClassVar, Literal
from urllib.parse import urlsplit

from pydantic import Field, SecretStr, field_validator, model_validator

from connectors.base import Connector, ConnectorConfig, Stream
from connectors.registry import register
from crmhub.errors import AuthError, RecordError
from crmhub.mapping import BUILTIN_MAPPINGS
from crmhub.records import Cursor, Page, RawRecord

__all__ = [
    "PROVIDERS",
    "WebformConfig",
    "WebformConnector",
    "delivery_id",
    "normalise",
    "records_for",
    "sign_generic",
    "verify",
]

Provider = Literal["typeform", "tally", "webflow", "hubspot", "generic"]
PROVIDERS: tuple[str, ...] = ("typeform", "tally", "webflow", "hubspot", "generic")


class WebformConfig(ConnectorConfig):
    provider: Provider = Field("generic", description="who signs and shapes the deliveries")
    secret: SecretStr | None = Field(
        None, description='signing secret, from the environment: "${FORMS_SECRET}"'
    )
    tolerance: int = Field(
        300, ge=1, description="seconds a signed timestamp may be off (replay window)"
    )
    public_url: str | None = Field(
        None,
        description="URL the sender posts to, as it sees it (HubSpot signs the URI; behind a "
        "proxy set it to https://host/hooks/forms/NAME)",
    )
    hosted: bool = Field(False, description="also accept plain HTML forms at POST /f/NAME")
    allowed_origins: list[str] = Field(
        default_factory=list,
        description="origins allowed to post the hosted form (https://www.example.com); empty: any",
    )
    thank_you_url: str | None = Field(None, description="where the hosted form redirects")
    honeypot: str = Field(
        "website_url", description="hidden field a person leaves empty; bots fill it"
    )
    rate_limit: int = Field(10, ge=1, description="hosted-form posts per minute per client IP")
    max_body_bytes: int = Field(262_144, ge=1024, description="larger bodies get 413")
    max_json_depth: int = Field(32, ge=2, description="deeper JSON gets 400")
    process: Literal["inline", "worker", "drain"] = Field(
        "inline",
        description="inline: `crmhub serve` maps and matches right after the 2xx (in its "
        "processor process); worker: it queues an arq job and `crmhub worker` processes "
        "(needs [queue] redis_url); drain: it only accepts, and `crmhub forms drain --follow` "
        "(another process) processes",
    )
    form_fields: list[str] = Field(
        default_factory=lambda: ["name", "email", "phone", "company", "message"],
        description="fields of the `crmhub forms snippet` form",
    )

    @model_validator(mode="before")
    @classmethod
    def _provider_mapping(cls, data: Any) -> Any:
        # One mapping per provider, chosen by `provider` unless `mapping` overrides it.
        if isinstance(data, dict) and not data.get("mapping"):
            provider = data.get("provider", "generic")
            if provider in PROVIDERS:
                data = {**data, "mapping": str(BUILTIN_MAPPINGS / f"webform_{provider}.toml")}
        return data

    @field_validator("public_url", "thank_you_url")
    @classmethod
    def _web_url(cls, value: str | None) -> str | None:
        # Only ever compared (public_url) or sent to browsers as a redirect (thank_you_url):
        # crmhub never fetches either. A javascript:/file: URL would still be a foot-gun.
        if value is not None:
            parts = urlsplit(value)
            if parts.scheme not in ("http", "https") or not parts.netloc:
                raise ValueError(f"must be an http(s) URL with a host, got {value!r}")
        return value

    @field_validator("allowed_origins")
    @classmethod
    def _origins(cls, values: list[str]) -> list[str]:
        for value in values:
            parts = urlsplit(value)
            if parts.scheme not in ("http", "https") or not parts.netloc or parts.path.strip("/"):
                raise ValueError(
                    f"an origin is scheme://host[:port] (https://www.example.com), got {value!r}"
                )
        return values

    @model_validator(mode="after")
    def _reachable(self) -> WebformConfig:
        if self.secret is None and not self.hosted:
            raise ValueError("set `secret` (signed webhooks) or `hosted = true` (HTML forms)")
        return self


@register("webform", label="Web forms (webhooks and hosted HTML forms)")
class WebformConnector(Connector[WebformConfig]):
    Config = WebformConfig
    streams: ClassVar[frozenset[Stream]] = frozenset({"activities"})

    async def check(self) -> str:
        where = ["POST /hooks/forms/" + self.name] if self.config.secret else []
        if self.config.hosted:
            where.append("POST /f/" + self.name)
        return f"{self.config.provider} deliveries at {', '.join(where)}"

    async def pull(self, stream: Stream, cursor: Cursor | None) -> AsyncIterator[Page]:
        """Nothing to pull: deliveries are pushed to `crmhub serve` and drained from the inbox."""
        return
        yield  # pragma: no cover - makes this an async generator


# -- signatures ---------------------------------------------------------------------------


def _hmac(secret: SecretStr, message: bytes) -> bytes:
    return hmac.new(secret.get_secret_value().encode(), message, hashlib.sha256).digest()


def _header(headers: Mapping[str, str], name: str) -> str:
    value = headers.get(name) or headers.get(name.lower())
    if not value:
        raise AuthError(f"missing {name} header", reason="missing_signature")
    return value


def _fresh(timestamp: str, tolerance: int, now: float, *, millis: bool) -> None:
    try:
        sent = int(timestamp) / (1000 if millis else 1)
    except ValueError:
        raise AuthError("malformed signature timestamp", reason="malformed_signature") from None
    if abs(now - sent) > tolerance:
        raise AuthError("signature timestamp outside the tolerance", reason="stale_timestamp")


def _same(expected: str, given: str) -> None:
    if not hmac.compare_digest(expected.encode(), given.strip().encode()):
        raise AuthError("signature does not match", reason="bad_signature")


_RESERVED = ":/?@!$'()*,;"
_PERCENT = re.compile("|".join(f"%{ord(c):02X}" for c in _RESERVED), re.IGNORECASE)


def _decode_reserved(uri: str) -> str:
    """`uri` with percent-encoded reserved characters (: / ? @ ! $ ' ( ) * , ;) decoded."""
    return _PERCENT.sub(lambda m: chr(int(m.group()[1:], 16)), uri)


def sign_generic(secret: str, body: bytes, timestamp: int) -> str:
    """The `X-Crmhub-Signature` value for `body` sent at `timestamp` (for senders and tests)."""
    mac = hmac.new(secret.encode(), f"{timestamp}.".encode() + body, hashlib.sha256)
    return f"t={timestamp},v1={mac.hexdigest()}"


def verify(
    config: WebformConfig,
    headers: Mapping[str, str],
    body: bytes,
    *,
    method: str,
    url: str,
    now: float,
) -> None:
    """Raise `AuthError` (with a `reason`) unless `body` is signed by the provider's scheme.

    Compared in constant time over the raw bytes, before anything is parsed.
    """
    secret = config.secret
    if secret is None:
        raise AuthError("no secret configured: webhook intake is off", reason="no_secret")
    provider = config.provider
    if provider == "typeform":
        # Typeform-Signature: sha256=<base64 HMAC-SHA256(secret, body)>; no timestamp.
        given = _header(headers, "Typeform-Signature")
        _same("sha256=" + base64.b64encode(_hmac(secret, body)).decode(), given)
    elif provider == "tally":
        # Tally-Signature: <base64 HMAC-SHA256(secret, body)>; no timestamp.
        given = _header(headers, "Tally-Signature")
        _same(base64.b64encode(_hmac(secret, body)).decode(), given)
    elif provider == "webflow":
        # x-webflow-signature: hex HMAC-SHA256(secret, "<timestamp ms>:<body>").
        stamp = _header(headers, "X-Webflow-Timestamp")
        given = _header(headers, "X-Webflow-Signature")
        _fresh(stamp, config.tolerance, now, millis=True)
        _same(_hmac(secret, stamp.encode() + b":" + body).hex(), given)
    elif provider == "hubspot":
        # v3: base64 HMAC-SHA256(secret, method + uri + body + timestamp ms).
        stamp = _header(headers, "X-HubSpot-Request-Timestamp")
        given = _header(headers, "X-HubSpot-Signature-v3")
        _fresh(stamp, config.tolerance, now, millis=True)
        uri = config.public_url or url
        # HubSpot signs the URI with its URL-encoded characters decoded; accept either form.
        for candidate in dict.fromkeys((uri, _decode_reserved(uri))):
            message = method.upper().encode() + candidate.encode() + body + stamp.encode()
            mac = base64.b64encode(_hmac(secret, message)).decode()
            if hmac.compare_digest(mac.encode(), given.strip().encode()):
                return
        raise AuthError("signature does not match", reason="bad_signature")
    else:
        # X-Crmhub-Signature: t=<unix s>,v1=<hex HMAC-SHA256(secret, "<t>.<body>")>[,v1=...]
        parts = [p.split("=", 1) for p in _header(headers, "X-Crmhub-Signature").split(",")]
        stamps = [v for k, v in (p for p in parts if len(p) == 2) if k.strip() == "t"]
        candidates = [v for k, v in (p for p in parts if len(p) == 2) if k.strip() == "v1"]
        if len(stamps) != 1 or not candidates:
            raise AuthError("malformed X-Crmhub-Signature", reason="malformed_signature")
        _fresh(stamps[0], config.tolerance, now, millis=False)
        expected = _hmac(secret, stamps[0].encode() + b"." + body).hex()
        # Several v1 values are allowed while a secret is rotated; every one is compared.
        matches = [hmac.compare_digest(expected.encode(), c.encode()) for c in candidates]
        if not any(matches):
            raise AuthError("signature does not match", reason="bad_signature")


# -- identity -----------------------------------------------------------------------------


def _body_hash(body: bytes) -> str:
    return "sha256:" + hashlib.sha256(body).hexdigest()


def delivery_id(
    provider: str, payload: dict[str, Any], headers: Mapping[str, str], body: bytes
) -> str:
    """What makes a delivery unique: the provider's event id, else a digest of the raw body
    (an identical body delivered twice is the same delivery)."""
    candidates: list[Any] = []
    if provider == "typeform":
        candidates = [payload.get("event_id")]
    elif provider == "tally":
        candidates = [payload.get("eventId")]
    elif provider == "webflow":
        inner = payload.get("payload")
        candidates = [inner.get("id") if isinstance(inner, dict) else None]
    elif provider == "hubspot":
        candidates = [
            payload.get("submissionId"),
            payload.get("conversionId"),
            _latest_form_submission(payload).get("conversion-id"),
        ]
    else:
        candidates = [
            headers.get("x-crmhub-delivery"),
            payload.get("delivery_id"),
            payload.get("submission_id"),
            payload.get("id"),
        ]
    for value in candidates:
        if isinstance(value, str | int) and not isinstance(value, bool) and str(value).strip():
            return f"{provider}:{str(value).strip()[:150]}"
    return _body_hash(body)


# -- payload -> one normalised submission --------------------------------------------------

_SLUG = re.compile(r"[^0-9a-z]+")
_EMAIL_TYPES = {"email", "input_email", "formemail"}
_PHONE_TYPES = {"phone_number", "input_phone_number", "formphone"}


def _slug(text: Any) -> str:
    return _SLUG.sub("_", str(text).strip().lower()).strip("_")[:100] or "field"


def _iso(value: Any) -> str | None:
    if isinstance(value, int | float) and not isinstance(value, bool):
        seconds = value / 1000 if value > 10**11 else value  # HubSpot sends milliseconds
        return datetime.fromtimestamp(seconds, UTC).isoformat()
    return str(value) if value not in (None, "") else None


def _typed(fields: dict[str, Any], typed: dict[str, Any], kind: str, key: str, value: Any) -> None:
    fields[key] = value
    low = kind.lower()
    if low in _EMAIL_TYPES:
        typed.setdefault("email", value)
    elif low in _PHONE_TYPES:
        typed.setdefault("phone", value)


def _typeform(payload: dict[str, Any]) -> dict[str, Any]:
    resp = payload.get("form_response")
    if not isinstance(resp, dict):
        raise RecordError("Typeform delivery without form_response", field="form_response")
    definition = resp.get("definition") or {}
    # Answers name their field by id; its readable ref may only be in the definition
    # (Typeform's documented example payload has no ref on the answers).
    refs = {
        f.get("id"): f.get("ref")
        for f in definition.get("fields") or []
        if isinstance(f, dict) and f.get("ref")
    }
    fields: dict[str, Any] = {}
    typed: dict[str, Any] = {}
    for answer in resp.get("answers") or []:
        if not isinstance(answer, dict):
            continue
        field = answer.get("field") or {}
        kind = str(answer.get("type", ""))
        value = answer.get(kind)
        if kind == "choice" and isinstance(value, dict):
            value = value.get("label") or value.get("other")
        elif kind == "choices" and isinstance(value, dict):
            value = value.get("labels") or []
        key = _slug(field.get("ref") or refs.get(field.get("id")) or field.get("id") or kind)
        _typed(fields, typed, kind, key, value)
    for key, value in (resp.get("hidden") or {}).items():
        fields.setdefault(_slug(key), value)
    return {
        "submission_id": resp.get("token"),
        "form": definition.get("title"),
        "form_id": resp.get("form_id"),
        "submitted_at": _iso(resp.get("submitted_at")),
        "fields": fields,
        "typed": typed,
    }


def _tally(payload: dict[str, Any]) -> dict[str, Any]:
    data = payload.get("data")
    if not isinstance(data, dict):
        raise RecordError("Tally delivery without data", field="data")
    fields: dict[str, Any] = {}
    typed: dict[str, Any] = {}
    for item in data.get("fields") or []:
        if not isinstance(item, dict):
            continue
        value = item.get("value")
        options = {
            o.get("id"): o.get("text") for o in item.get("options") or [] if isinstance(o, dict)
        }
        if options and isinstance(value, list):  # choices arrive as option ids
            value = [options.get(v, v) if isinstance(v, str) else v for v in value]
        key = _slug(item.get("label") or item.get("key"))
        _typed(fields, typed, str(item.get("type", "")), key, value)
    return {
        "submission_id": data.get("responseId") or data.get("submissionId"),
        "form": data.get("formName"),
        "form_id": data.get("formId"),
        "submitted_at": _iso(data.get("createdAt") or payload.get("createdAt")),
        "fields": fields,
        "typed": typed,
    }


def _webflow(payload: dict[str, Any]) -> dict[str, Any]:
    inner = payload.get("payload")
    if not isinstance(inner, dict) or not isinstance(inner.get("data"), dict):
        raise RecordError("Webflow delivery without payload.data", field="payload.data")
    schema = [s for s in inner.get("schema") or [] if isinstance(s, dict)]
    kinds = {s.get("fieldName"): str(s.get("fieldType", "")) for s in schema}
    # `data` is keyed by field name; a key that is a field's element id gets its name.
    names = {s.get("fieldElementId"): s.get("fieldName") for s in schema if s.get("fieldName")}
    fields: dict[str, Any] = {}
    typed: dict[str, Any] = {}
    for key, value in inner["data"].items():
        name = names.get(key, key)
        _typed(fields, typed, kinds.get(name, ""), _slug(name), value)
    return {
        "submission_id": inner.get("id"),
        "form": inner.get("name"),
        "form_id": inner.get("formId"),
        "submitted_at": _iso(inner.get("submittedAt")),
        "fields": fields,
        "typed": typed,
    }


def _scalar(value: Any) -> bool:
    return value is None or isinstance(value, str | int | float | bool)


def _latest_form_submission(payload: dict[str, Any]) -> dict[str, Any]:
    """The newest entry of a contact's `form-submissions` (workflow webhook), or {}."""
    entries = [e for e in payload.get("form-submissions") or [] if isinstance(e, dict)]
    timed = [e for e in entries if isinstance(e.get("timestamp"), int | float)]
    if timed:
        return max(timed, key=lambda e: e["timestamp"])
    return entries[0] if entries else {}


def _hubspot(payload: dict[str, Any]) -> dict[str, Any]:
    fields: dict[str, Any] = {}
    raw = payload.get("fields") or payload.get("values")
    latest: dict[str, Any] = {}
    if isinstance(raw, list):  # Forms API shapes: [{"name": ..., "value": ...}]
        for item in raw:
            if isinstance(item, dict) and item.get("name"):
                fields[_slug(item["name"])] = item.get("value")
    elif isinstance(payload.get("properties"), dict):
        # A workflow's "Send a webhook": the enrolled contact as the contacts API returns it,
        # {"value": ..., "versions": [...]} per property, and its newest form submission.
        for name, value in payload["properties"].items():
            if str(name).startswith("hs_"):
                continue  # HubSpot's own analytics and system properties, not answers
            fields[_slug(name)] = value.get("value") if isinstance(value, dict) else value
        latest = _latest_form_submission(payload)
    else:
        # "Customize request body": the properties the workflow picked, as flat JSON.
        fields = {_slug(k): v for k, v in payload.items() if _scalar(v)}
        if not fields:
            raise RecordError("HubSpot delivery without fields or properties", field="fields")
    raw_context = payload.get("context")
    context: dict[str, Any] = raw_context if isinstance(raw_context, dict) else {}
    return {
        "submission_id": payload.get("submissionId")
        or payload.get("conversionId")
        or latest.get("conversion-id"),
        "form": payload.get("formName") or context.get("pageName") or latest.get("title"),
        "form_id": payload.get("formId") or payload.get("formGuid") or latest.get("form-id"),
        "submitted_at": _iso(payload.get("submittedAt") or latest.get("timestamp")),
        "fields": fields,
        "typed": {},
    }


_GENERIC_META = {"id", "submission_id", "delivery_id", "form", "form_id", "submitted_at"}


def _generic(payload: dict[str, Any]) -> dict[str, Any]:
    nested = payload.get("fields")
    source: dict[str, Any] = nested if isinstance(nested, dict) else payload
    fields = {
        _slug(k): v
        for k, v in source.items()
        if (source is not payload or k not in _GENERIC_META) and not isinstance(v, dict)
    }
    return {
        "submission_id": payload.get("submission_id") or payload.get("id"),
        "form": payload.get("form"),
        "form_id": payload.get("form_id"),
        "submitted_at": _iso(payload.get("submitted_at")),
        "fields": fields,
        "typed": {},
    }


_NORMALISERS = {
    "typeform": _typeform,
    "tally": _tally,
    "webflow": _webflow,
    "hubspot": _hubspot,
    "generic": _generic,
}


def normalise(
    provider: str, payload: dict[str, Any], delivery: str, received_at: datetime
) -> dict[str, Any]:
    """One flat submission from a provider's payload (see the module docstring).

    Raises `RecordError` when the payload is not the provider's shape at all.
    """
    out = _NORMALISERS[provider](payload)
    out["provider"] = provider
    out["submission_id"] = str(out.get("submission_id") or delivery)
    out["submitted_at"] = out.get("submitted_at") or received_at.isoformat()
    out["form"] = out.get("form") or out.get("form_id") or provider
    return out


def records_for(submission: dict[str, Any], origin: str) -> list[RawRecord]:
    """A submission is two records: its submitter (contact) and the submission (activity)."""
    sid = submission["submission_id"]
    return [
        RawRecord(sid, "contact", submission, origin=origin),
        RawRecord(sid, "activity", submission, origin=origin),
    ]
