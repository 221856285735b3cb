"""IMAP mailboxes (imapclient): every message an `email` activity, correspondents contacts.

Incremental by folder: the cursor keeps `(UIDVALIDITY, last UID, HIGHESTMODSEQ)` per folder.
A run selects each folder read-only (EXAMINE, so nothing is marked \\Seen) and:

- skips it without a FETCH when UIDVALIDITY, UIDNEXT and (with CONDSTORE) HIGHESTMODSEQ say
  nothing arrived;
- otherwise fetches the UIDs above the last one, `page_size` at a time, each page committed
  with its cursor, so a dropped connection resumes after the last committed page;
- on a UIDVALIDITY change forgets the folder's UIDs and reads it again. The message's
  Message-ID (or a derived id) is the activity's identity, so the resync re-stages the same
  records unchanged: nothing is duplicated.

Only the header and the first `body_bytes` of the body are fetched (`BODY.PEEK[TEXT]<0.n>`):
no attachment ever crosses the wire. imapclient is synchronous, so every round trip runs in
a worker thread.

Login is LOGIN with `password`, or AUTHENTICATE XOAUTH2 with an access token from the shared
OAuth2 refresh flow (`refresh_token`, `client_id`, `token_url`; connectors.oauth).
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import imaplib
import logging
import ssl
from collections.abc import AsyncIterator, Callable
from typing import Any, ClassVar, Literal, TypeVar

import httpx
from imapclient import IMAPClient
from imapclient.exceptions import IMAPClientAbortError, IMAPClientError, LoginError
from pydantic import Field, SecretStr, model_validator

from connectors.base import Connector, ConnectorConfig, Stream
from connectors.email_parsing import MailIdentity, email_records, parse_email
from connectors.oauth import RefreshToken, shared_refresh_token
from connectors.registry import register
from crmhub.errors import AuthError, ConnectorError, PermanentError, TransientError
from crmhub.records import Cursor, Page, RawRecord

__all__ = ["ImapConnector"]

log = logging.getLogger(__name__)
T = TypeVar("T")

# RFC 5530 codes that mean "later", not "never".
_TRANSIENT_CODES = ("[UNAVAILABLE]", "[LIMIT]", "[INUSE]", "[SERVERBUG]")


class ImapConfig(ConnectorConfig):
    host: str = Field(description="IMAP server host name")
    port: int | None = Field(None, ge=1, le=65535, description="993 for tls, else 143")
    username: str = Field(description="login name (usually the mailbox address)")
    password: SecretStr | None = Field(None, description="password for LOGIN, e.g. ${IMAP_PASS}")
    refresh_token: SecretStr | None = Field(
        None,
        description="OAuth2 refresh token: log in with AUTHENTICATE XOAUTH2 instead of a password",
    )
    client_id: str | None = Field(None, description="OAuth2 client id (with refresh_token)")
    client_secret: SecretStr | None = Field(
        None, description="OAuth2 client secret (with refresh_token; public clients have none)"
    )
    token_url: str | None = Field(
        None, description="OAuth2 token endpoint that trades the refresh token for access tokens"
    )
    scope: str | None = Field(
        None, description="OAuth2 scope to ask for (Microsoft needs it; Google does not)"
    )
    security: Literal["tls", "starttls", "none"] = Field(
        "tls", description="tls: implicit TLS; starttls: upgrade on 143; none: loopback only"
    )
    ca_file: str | None = Field(None, description="CA bundle to trust (self-signed servers)")
    folders: list[str] = Field(
        default_factory=lambda: ["INBOX", "Sent"], description="folders to read"
    )
    owner: list[str] = Field(
        default_factory=list, description="the mailbox owner's addresses (username is one)"
    )
    internal_domains: list[str] = Field(
        default_factory=list, description="colleagues' domains: never turned into contacts"
    )
    page_size: int = Field(500, ge=1, le=5000, description="messages per FETCH and commit")
    body_bytes: int = Field(4096, ge=0, le=1_000_000, description="body bytes read per message")
    timeout: float = Field(30.0, gt=0, description="socket timeout in seconds")

    @model_validator(mode="after")
    def _one_credential(self) -> ImapConfig:
        if (self.password is None) == (self.refresh_token is None):
            raise ValueError(
                "set exactly one of password (LOGIN) or refresh_token (XOAUTH2, with "
                "client_id and token_url)"
            )
        if self.refresh_token is not None:
            missing = [k for k in ("client_id", "token_url") if not getattr(self, k)]
            if missing:
                raise ValueError(f"refresh_token (XOAUTH2) also needs {' and '.join(missing)}")
        if not self.folders:
            raise ValueError("folders must name at least one folder")
        return self

    @property
    def xoauth2(self) -> bool:
        return self.refresh_token is not None


@register("imap", label="IMAP mailbox")
class ImapConnector(Connector[ImapConfig]):
    """One IMAP account; `activities` carries the messages and the correspondents."""

    Config = ImapConfig
    streams: ClassVar[frozenset[Stream]] = frozenset({"activities"})

    @property
    def identity(self) -> MailIdentity:
        owner = [*self.config.owner]
        if "@" in self.config.username:
            owner.append(self.config.username)
        return MailIdentity.of(owner, self.config.internal_domains)

    async def check(self) -> str:
        imap = await self._open()
        try:
            counts = []
            for folder in self.config.folders:
                info = await self._call(functools.partial(self._select, imap, folder))
                counts.append(f"{folder}: {int(info.get(b'EXISTS', 0)):,}")
        finally:
            await asyncio.to_thread(_logout, imap)
        return f"{self.config.host}: login ok; " + ", ".join(counts)

    async def pull(self, stream: Stream, cursor: Cursor | None) -> AsyncIterator[Page]:
        state: dict[str, dict[str, Any]] = {
            k: dict(v) for k, v in ((cursor or {}).get("folders") or {}).items()
        }
        imap = await self._open()
        try:
            condstore = bool(imap.has_capability("CONDSTORE") and imap.has_capability("ENABLE"))
            if condstore:
                await self._call(lambda: imap.enable("CONDSTORE"))
            for folder in self.config.folders:
                async for page in self._folder(imap, folder, state, condstore):
                    yield page
        finally:
            await asyncio.to_thread(_logout, imap)

    async def _folder(
        self, imap: IMAPClient, folder: str, state: dict[str, dict[str, Any]], condstore: bool
    ) -> AsyncIterator[Page]:
        info = await self._call(lambda: self._select(imap, folder))
        validity = int(info[b"UIDVALIDITY"])
        uidnext = int(info[b"UIDNEXT"]) if b"UIDNEXT" in info else None
        modseq = int(info[b"HIGHESTMODSEQ"]) if condstore and b"HIGHESTMODSEQ" in info else None
        known = state.get(folder)
        last = 0
        if known is not None and known.get("uidvalidity") == validity:
            last = int(known.get("uid") or 0)
            unchanged_modseq = modseq is not None and known.get("modseq") == modseq
            if unchanged_modseq or (uidnext is not None and uidnext <= last + 1):
                if known.get("modseq") != modseq:
                    state[folder] = {**known, "modseq": modseq}
                    yield Page([], {"folders": _copy(state)})
                return
        elif known is not None:
            log.warning(
                "imap UIDVALIDITY changed; resyncing folder",
                extra={"connector": self.name, "folder": folder},
            )
        uids = await self._call(lambda: imap.search(["UID", f"{last + 1}:*"]))
        # `n:*` always matches the highest UID, even below n: drop what was already read.
        todo = sorted(int(u) for u in uids if int(u) > last)
        size = self.config.page_size
        for start in range(0, len(todo), size):
            chunk = todo[start : start + size]
            data = await self._call(functools.partial(imap.fetch, chunk, self._fetch_items()))
            records, rejects = self._records(folder, validity, chunk, data)
            done = start + size >= len(todo)
            state[folder] = {
                "uidvalidity": validity,
                "uid": chunk[-1],
                # The folder's modseq is only true once every UID below it has been read.
                "modseq": modseq if done else None,
            }
            yield Page(records, {"folders": _copy(state)}, rejects, total_hint=len(todo))
        if not todo:
            state[folder] = {"uidvalidity": validity, "uid": last, "modseq": modseq}
            yield Page([], {"folders": _copy(state)})

    def _fetch_items(self) -> list[str]:
        items = ["INTERNALDATE", "RFC822.SIZE", "BODY.PEEK[HEADER]"]
        if self.config.body_bytes:
            items.append(f"BODY.PEEK[TEXT]<0.{self.config.body_bytes}>")
        return items

    def _records(
        self, folder: str, validity: int, uids: list[int], data: dict[int, dict[bytes, Any]]
    ) -> tuple[list[RawRecord], list[tuple[str, str, str]]]:
        records: list[RawRecord] = []
        rejects: list[tuple[str, str, str]] = []
        identity = self.identity
        for uid in uids:
            origin = f"imap {self.config.host} {folder} uid {uid} (uidvalidity {validity})"
            item = data.get(uid)
            if item is None:
                continue  # expunged between SEARCH and FETCH
            header = item.get(b"BODY[HEADER]")
            body = next((v for k, v in item.items() if k.startswith(b"BODY[TEXT]")), b"")
            if not isinstance(header, bytes) or not header.strip():
                rejects.append((origin, "the server returned no header for this message", ""))
                continue
            parsed = parse_email(header + (body if isinstance(body, bytes) else b""))
            records.extend(email_records(parsed, origin, identity))
        return records, rejects

    # -- connection -------------------------------------------------------------------

    async def _open(self) -> IMAPClient:
        """Connect and log in: LOGIN with the password, or XOAUTH2 with an access token.

        The access token comes from the process's shared refresh flow (reused while it is
        valid). A cached token the server refuses (revoked or expired early) is replaced
        once; a freshly issued token that is refused is an `AuthError` at once.
        """
        if not self.config.xoauth2:
            return await self._call(functools.partial(self._connect, None))
        token = self._refresh_token()
        cached = token.valid()
        access = cached or await self._fresh_access(token)
        try:
            return await self._call(functools.partial(self._connect, access))
        except AuthError:
            if cached is None:
                raise
        log.info(
            "imap XOAUTH2 access token refused; refreshing it once",
            extra={"connector": self.name},
        )
        token.invalidate()
        access = await self._fresh_access(token)
        return await self._call(functools.partial(self._connect, access))

    def _refresh_token(self) -> RefreshToken:
        cfg = self.config
        assert cfg.refresh_token is not None  # the validator requires the other two with it
        assert cfg.client_id is not None
        assert cfg.token_url is not None
        return shared_refresh_token(
            connector=self.name,
            token_url=cfg.token_url,
            client_id=cfg.client_id,
            client_secret=cfg.client_secret.get_secret_value() if cfg.client_secret else None,
            refresh_token=cfg.refresh_token.get_secret_value(),
            scope=cfg.scope,
        )

    async def _fresh_access(self, token: RefreshToken) -> str:
        if self.context.client is not None:
            return await token.refresh(self.context.client)
        async with httpx.AsyncClient(timeout=self.config.timeout) as client:
            return await token.refresh(client)

    def _connect(self, access_token: str | None) -> IMAPClient:
        cfg = self.config
        context = ssl.create_default_context(cafile=cfg.ca_file) if cfg.security != "none" else None
        port = cfg.port or (993 if cfg.security == "tls" else 143)
        imap = IMAPClient(
            cfg.host,
            port=port,
            ssl=cfg.security == "tls",
            ssl_context=context,
            timeout=cfg.timeout,
        )
        try:
            if cfg.security == "starttls":
                imap.starttls(context)
            if access_token is not None:
                imap.oauth2_login(cfg.username, access_token)
            else:
                assert cfg.password is not None
                imap.login(cfg.username, cfg.password.get_secret_value())
        except BaseException:
            _logout(imap)
            raise
        return imap

    def _select(self, imap: IMAPClient, folder: str) -> dict[bytes, Any]:
        try:
            return dict(imap.select_folder(folder, readonly=True))
        except IMAPClientAbortError:
            raise
        except IMAPClientError as exc:
            if imap.folder_exists(folder):
                raise
            names = sorted(str(f[2]) for f in imap.list_folders())
            raise PermanentError(
                f"{self.name}: IMAP folder {folder!r} does not exist "
                f"(the server has: {', '.join(names[:20])}); fix the folders setting",
                connector=self.name,
                stream="activities",
            ) from exc

    async def _call(self, fn: Callable[[], T]) -> T:
        """Run one blocking imapclient call in a thread; translate its errors."""
        try:
            return await asyncio.to_thread(fn)
        except ConnectorError:
            raise
        except LoginError as exc:
            if any(code in str(exc) for code in _TRANSIENT_CODES):
                # e.g. Dovecot's "[UNAVAILABLE] Temporary authentication failure": its password
                # or token check is down, the credentials may be fine.
                raise TransientError(
                    f"{self.name}: the IMAP server could not check the login of "
                    f"{self.config.username!r} right now: {_short(exc)}",
                    connector=self.name,
                    stream="activities",
                ) from None
            if self.config.xoauth2:
                hint = (
                    "a freshly issued OAuth2 access token: check that 'username' is the account "
                    "the refresh token belongs to and that its scope allows IMAP "
                    "(Google: https://mail.google.com/; Microsoft: "
                    "https://outlook.office.com/IMAP.AccessAsUser.All)"
                )
            else:
                hint = f"the password: check the 'password' setting of connector {self.name!r}"
            raise AuthError(
                f"{self.name}: the IMAP server refused the login of {self.config.username!r} "
                f"with {hint}",
                connector=self.name,
                stream="activities",
            ) from None
        except ssl.SSLCertVerificationError as exc:
            raise PermanentError(
                f"{self.name}: TLS certificate of {self.config.host} not trusted "
                f"({exc.verify_message}); set ca_file or fix the host name",
                connector=self.name,
                stream="activities",
            ) from None
        except (IMAPClientAbortError, imaplib.IMAP4.abort, OSError, EOFError) as exc:
            # Dropped connection, timeout, refused connect: a later run resumes from the
            # last committed page.
            raise TransientError(
                f"{self.name}: IMAP connection to {self.config.host} failed: "
                f"{type(exc).__name__}: {_short(exc)}",
                connector=self.name,
                stream="activities",
            ) from None
        except IMAPClientError as exc:
            text = _short(exc)
            cls = TransientError if any(c in text for c in _TRANSIENT_CODES) else PermanentError
            raise cls(
                f"{self.name}: IMAP server said: {text}", connector=self.name, stream="activities"
            ) from None


def _short(exc: BaseException) -> str:
    return " ".join(str(exc).split())[:200]


def _copy(state: dict[str, dict[str, Any]]) -> dict[str, dict[str, Any]]:
    return {k: dict(v) for k, v in state.items()}


def _logout(imap: IMAPClient) -> None:
    try:
        imap.logout()
    except (IMAPClientError, OSError, imaplib.IMAP4.error):
        with contextlib.suppress(OSError, imaplib.IMAP4.error):
            imap.shutdown()
