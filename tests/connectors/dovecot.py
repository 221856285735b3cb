"""A private Dovecot for the IMAP tests: throwaway config, loopback port, passwd-file user.

`Dovecot.start()` writes a config under a fresh temp dir, starts `dovecot -F` on an ephemeral
127.0.0.1 port (plain + implicit TLS with a self-signed cert) and waits for the greeting;
`stop()` kills exactly that process and removes the dir. Messages are seeded over IMAP APPEND,
as a mail client would. Nothing depends on the system's dovecot service.

`OAuthProvider` is a tiny identity provider on loopback (real HTTP): a token endpoint that
trades refresh tokens for access tokens, and an RFC 7662 introspection endpoint. A Dovecot
started with its `introspection_url` also offers AUTHENTICATE XOAUTH2 and checks every token
there (Dovecot's `oauth2` passdb), as a Google or Microsoft IMAP server checks theirs.
"""

from __future__ import annotations

import contextlib
import json
import os
import pwd
import re
import secrets
import shutil
import socket
import ssl
import subprocess
import tempfile
import threading
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from email.utils import format_datetime
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs

from imapclient import IMAPClient

USER = "sales@crmhub.test"
PASSWORD = "s3cret-pass"
# Dovecot 2.3's post-login capabilities less CONDSTORE and QRESYNC.
_NO_CONDSTORE = (
    "IMAP4rev1 SASL-IR LOGIN-REFERRALS ID ENABLE IDLE SORT SORT=DISPLAY THREAD=REFERENCES "
    "MULTIAPPEND URL-PARTIAL CATENATE UNSELECT CHILDREN NAMESPACE UIDPLUS LIST-EXTENDED "
    "I18NLEVEL=1 ESEARCH ESORT SEARCHRES WITHIN CONTEXT=SEARCH LIST-STATUS BINARY MOVE "
    "SPECIAL-USE LITERAL+"
)


def _scratch_dir() -> Path:
    """A fresh dir, in memory (/dev/shm) where there is one: seeding and removing 20,000
    maildir files then never waits for a disk that PostgreSQL is busy flushing."""
    shm = Path("/dev/shm")
    base = str(shm) if shm.is_dir() and os.access(shm, os.W_OK) else None
    return Path(tempfile.mkdtemp(prefix="crmhub-dovecot-", dir=base))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class Dovecot:
    root: Path = field(default_factory=_scratch_dir)
    port: int = 0
    tls_port: int = 0
    process: subprocess.Popen[bytes] | None = None
    users: list[str] = field(default_factory=list)
    # With an introspection URL, AUTHENTICATE XOAUTH2 is offered too (see OAuthProvider).
    oauth2_introspection_url: str | None = None
    # False: a server without CONDSTORE/QRESYNC (Dovecot offers both by default).
    condstore: bool = True

    @property
    def cert(self) -> Path:
        return self.root / "cert.pem"

    def start(self) -> Dovecot:
        binary = shutil.which("dovecot") or "/usr/sbin/dovecot"
        if not os.path.exists(binary):
            raise FileNotFoundError("dovecot binary not found (apt-get install dovecot-imapd)")
        self.root.chmod(0o755)
        self.port, self.tls_port = _free_port(), _free_port()
        key = self.root / "key.pem"
        subprocess.run(
            ["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2",
             "-subj", "/CN=localhost", "-addext", "subjectAltName=IP:127.0.0.1,DNS:localhost",
             "-keyout", str(key), "-out", str(self.cert)],
            check=True, capture_output=True,
        )  # fmt: skip
        me = pwd.getpwuid(os.getuid())
        # Dovecot refuses mail access as root: mail runs as the `dovecot` user then.
        mail_user = pwd.getpwnam("dovecot") if os.getuid() == 0 else me
        internal = "dovecot" if os.getuid() == 0 else me.pw_name
        login = "dovenull" if os.getuid() == 0 else me.pw_name
        home = self.root / "home"
        home.mkdir()
        os.chown(home, mail_user.pw_uid, mail_user.pw_gid)
        self.users = [USER] + [f"rep{n}@crmhub.test" for n in range(1, 100)]
        (self.root / "passwd").write_text("".join(f"{u}:{{PLAIN}}{PASSWORD}\n" for u in self.users))
        mechanisms = "plain login"
        oauth2_passdb = ""
        if self.oauth2_introspection_url:
            mechanisms += " xoauth2"
            (self.root / "oauth2.conf.ext").write_text(
                "introspection_mode = post\n"
                f"introspection_url = {self.oauth2_introspection_url}\n"
                "force_introspection = yes\n"
                "username_attribute = username\n"
                "active_attribute = active\n"
                "active_value = true\n"
                "timeout_msecs = 5000\n"
            )
            oauth2_passdb = (
                "passdb {\n  driver = oauth2\n  mechanisms = xoauth2\n"
                f"  args = {self.root}/oauth2.conf.ext\n}}\n"
            )
        capabilities = "" if self.condstore else f"imap_capability = {_NO_CONDSTORE}"
        (self.root / "dovecot.conf").write_text(
            f"""
base_dir = {self.root}/run
state_dir = {self.root}/state
log_path = {self.root}/dovecot.log
instance_name = crmhub-test-{self.port}
protocols = imap
listen = 127.0.0.1
default_internal_user = {internal}
default_login_user = {login}
first_valid_uid = 1
ssl = yes
ssl_cert = <{self.cert}
ssl_key = <{key}
disable_plaintext_auth = no
auth_mechanisms = {mechanisms}
auth_failure_delay = 0
mail_location = maildir:~/Maildir
# Throwaway mail: no fsync per APPENDed message (seeding 20,000 is disk-bound otherwise).
mail_fsync = never
{capabilities}
# What each session fetched, so tests can prove a no-op run fetched nothing.
imap_logout_format = in=%i out=%o fetch_hdr_count=%{{fetch_hdr_count}} \
  fetch_body_count=%{{fetch_body_count}}
{oauth2_passdb}passdb {{
  driver = passwd-file
  args = {self.root}/passwd
}}
userdb {{
  driver = static
  args = uid={mail_user.pw_uid} gid={mail_user.pw_gid} home={home}/%u
}}
namespace inbox {{
  inbox = yes
  mailbox Sent {{
    special_use = \\Sent
    auto = create
  }}
}}
service imap-login {{
  inet_listener imap {{
    address = 127.0.0.1
    port = {self.port}
  }}
  inet_listener imaps {{
    address = 127.0.0.1
    port = {self.tls_port}
    ssl = yes
  }}
}}
# No anti-brute-force delay (2-15 s per login after a failure from 127.0.0.1): the auth
# tests fail logins on purpose and count the attempts in the log instead.
service anvil {{
  unix_listener anvil-auth-penalty {{
    mode = 0
  }}
}}
service stats {{
  unix_listener stats-reader {{
    mode = 0666
  }}
  unix_listener stats-writer {{
    mode = 0666
  }}
}}
"""
        )
        self.process = subprocess.Popen(
            [binary, "-F", "-c", str(self.root / "dovecot.conf")],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
        )
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                err = self.process.stderr.read().decode() if self.process.stderr else ""
                raise RuntimeError(f"dovecot exited: {err.strip()[:500]} {self.log()[-500:]}")
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=1) as s:
                    if s.recv(64).startswith(b"* OK"):
                        return self
            except OSError:
                time.sleep(0.05)
        self.stop()
        raise RuntimeError("dovecot did not greet within 15 s")

    def log(self) -> str:
        path = self.root / "dovecot.log"
        return path.read_text(errors="replace") if path.exists() else ""

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        if self.process is not None and self.process.stderr:
            self.process.stderr.close()
        self.process = None
        shutil.rmtree(self.root, ignore_errors=True)

    def fetch_counts(
        self, user: str, *, since: int = 0, sessions: int = 1
    ) -> list[tuple[int, int]]:
        """(headers, bodies) fetched by each of `user`'s sessions logged out after `since`.

        Waits up to 3 s for `sessions` of them: Dovecot's log process writes a moment later.
        """
        deadline = time.monotonic() + 3
        pattern = (
            rf"imap\({re.escape(user)}\).*Logged out in=\d+ out=\d+ "
            r"fetch_hdr_count=(\d+)\s+fetch_body_count=(\d+)"
        )
        while True:
            found = re.findall(pattern, self.log()[since:])
            if len(found) >= sessions or time.monotonic() > deadline:
                return [(int(h), int(b)) for h, b in found]
            time.sleep(0.05)

    def add_user(self, user: str) -> str:
        """A fresh mailbox; the users were written at start (passwd-file caches by mtime)."""
        if user not in self.users:
            raise KeyError(f"{user} is not one of the {len(self.users)} pre-made test users")
        return user

    def client(self, user: str = USER) -> IMAPClient:
        imap = IMAPClient("127.0.0.1", port=self.port, ssl=False, timeout=30)
        imap.login(user, PASSWORD)
        return imap

    def tls_context(self) -> ssl.SSLContext:
        return ssl.create_default_context(cafile=str(self.cert))

    def append(self, folder: str, messages: Iterable[bytes], user: str = USER) -> int:
        """APPEND messages to `folder` (created if missing); returns how many."""
        n = 0
        with self.client(user) as imap:
            if not imap.folder_exists(folder):
                imap.create_folder(folder)
            batch: list[bytes] = []
            for raw in messages:
                batch.append(raw)
                if len(batch) >= 500:
                    imap.multiappend(folder, batch)
                    n += len(batch)
                    batch = []
            if batch:
                imap.multiappend(folder, batch)
                n += len(batch)
        return n

    def reset_uidvalidity(self, folder: str, user: str = USER) -> None:
        """Recreate `folder` with the same messages: new UIDVALIDITY, new UIDs."""
        with self.client(user) as imap:
            imap.select_folder(folder)
            uids = imap.search("ALL")
            raws = [d[b"RFC822"] for d in imap.fetch(uids, ["RFC822"]).values()] if uids else []
            imap.close_folder()
            imap.delete_folder(folder)
            imap.create_folder(folder)
            if raws:
                imap.multiappend(folder, raws)


def message(
    i: int,
    *,
    sender: str = "Ann Buyer <ann{i}@customer.example>",
    to: str = f"Sales Team <{USER}>",
    subject: str = "Quote #{i}",
    body: str = "Hello, about the quote {i}.",
    message_id: str | None = "<msg-{i}@customer.example>",
    extra: str = "",
    when: datetime | None = None,
) -> bytes:
    """A small RFC 5322 message; `{i}` in any field is replaced by the number."""
    when = when or datetime(2026, 3, 1, 9, 0, tzinfo=UTC) + timedelta(minutes=i)
    lines = [
        f"From: {sender}",
        f"To: {to}",
        f"Subject: {subject}",
        f"Date: {format_datetime(when)}",
    ]
    if message_id:
        lines.append(f"Message-ID: {message_id}")
    if extra:
        lines.append(extra.rstrip("\r\n"))
    lines += ["MIME-Version: 1.0", "Content-Type: text/plain; charset=utf-8", "", body, ""]
    return "\r\n".join(lines).replace("{i}", str(i)).encode()


class CuttingProxy:
    """A loopback TCP proxy that drops its first connection after `cut_after` server bytes.

    Stands in for a server or network that closes the connection mid-FETCH. Later
    connections pass through untouched.
    """

    def __init__(self, target_port: int, cut_after: int) -> None:
        self.target_port = target_port
        self.cut_after = cut_after
        self.connections = 0
        self.cuts = 0
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.port = int(self._listener.getsockname()[1])
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()

    def _serve(self) -> None:
        self._listener.settimeout(0.2)
        while not self._stop.is_set():
            try:
                client, _ = self._listener.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            self.connections += 1
            upstream = socket.create_connection(("127.0.0.1", self.target_port))
            limit = self.cut_after if self.connections == 1 else None
            threading.Thread(target=self._pipe, args=(client, upstream, None), daemon=True).start()
            threading.Thread(target=self._pipe, args=(upstream, client, limit), daemon=True).start()

    def _pipe(self, src: socket.socket, dst: socket.socket, limit: int | None) -> None:
        sent = 0
        try:
            while data := src.recv(65536):
                if limit is not None and sent + len(data) > limit:
                    dst.sendall(data[: max(0, limit - sent)])
                    self.cuts += 1
                    break
                dst.sendall(data)
                sent += len(data)
        except OSError:
            pass
        for s in (src, dst):
            with contextlib.suppress(OSError):
                s.shutdown(socket.SHUT_RDWR)
            s.close()

    def close(self) -> None:
        self._stop.set()
        self._listener.close()
        self._thread.join(timeout=2)


@dataclass
class _Grant:
    user: str
    lifetime: float
    revoked: bool = False


@dataclass
class _Access:
    user: str
    expires: float
    refresh_token: str


class OAuthProvider:
    """Loopback identity provider: `POST /token` (refresh_token grant) and `POST /introspect`.

    `grant(user, lifetime=)` issues a refresh token whose access tokens live `lifetime` seconds
    (their `expires_in`); `revoke(refresh_token)` makes the token endpoint answer
    `invalid_grant` and ends its access tokens; `expire(user)` makes every access token issued
    so far inactive at once (a server-side expiry the client cannot know about). Counts every
    request it serves.
    """

    def __init__(self, *, client_id: str = "crmhub-test") -> None:
        self.client_id = client_id
        self.client_secret = "client-" + secrets.token_hex(8)
        self.token_requests = 0
        self.introspections = 0
        self.issued: list[str] = []  # every access token handed out, for leak checks
        self.introspection_down = False  # answer 503: the token check is unavailable
        self._grants: dict[str, _Grant] = {}
        self._access: dict[str, _Access] = {}
        self._lock = threading.Lock()
        provider = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                length = int(self.headers.get("content-length") or 0)
                form = {k: v[0] for k, v in parse_qs(self.rfile.read(length).decode()).items()}
                status, body = provider._answer(self.path, form)
                data = json.dumps(body).encode()
                self.send_response(status)
                self.send_header("content-type", "application/json")
                self.send_header("content-length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def log_message(self, format: str, *args: Any) -> None:
                pass  # quiet: the tests read the counters

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self._server.server_port}"
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)
        self._thread.start()

    @property
    def token_url(self) -> str:
        return self.url + "/token"

    @property
    def introspection_url(self) -> str:
        return self.url + "/introspect"

    def grant(self, user: str, *, lifetime: float = 3600.0) -> str:
        refresh = "rt-" + secrets.token_urlsafe(24)
        with self._lock:
            self._grants[refresh] = _Grant(user, lifetime)
        return refresh

    def issued_to(self) -> list[tuple[str, str]]:
        """(user, access token) for every token handed out."""
        with self._lock:
            return [(a.user, token) for token, a in self._access.items()]

    def revoke(self, refresh_token: str) -> None:
        """Revoke the grant: refreshes fail, and its access tokens stop working (as Google's)."""
        with self._lock:
            self._grants[refresh_token].revoked = True
            for access in self._access.values():
                if access.refresh_token == refresh_token:
                    access.expires = 0.0

    def expire(self, user: str) -> None:
        with self._lock:
            for access in self._access.values():
                if access.user == user:
                    access.expires = 0.0

    def _answer(self, path: str, form: dict[str, str]) -> tuple[int, dict[str, Any]]:
        with self._lock:
            if path == "/token":
                self.token_requests += 1
                grant = self._grants.get(form.get("refresh_token", ""))
                client_ok = (
                    form.get("client_id") == self.client_id
                    and form.get("client_secret") == self.client_secret
                )
                if form.get("grant_type") != "refresh_token" or not client_ok:
                    return 401, {"error": "invalid_client"}
                if grant is None or grant.revoked:
                    return 400, {"error": "invalid_grant", "error_description": "Token revoked"}
                access = "at-" + secrets.token_urlsafe(24)
                self._access[access] = _Access(
                    grant.user, time.time() + grant.lifetime, form["refresh_token"]
                )
                self.issued.append(access)
                return 200, {
                    "access_token": access,
                    "token_type": "Bearer",
                    "expires_in": int(grant.lifetime),
                }
            if path == "/introspect":
                self.introspections += 1
                if self.introspection_down:
                    return 503, {"error": "temporarily_unavailable"}
                known = self._access.get(form.get("token", ""))
                if known is None or known.expires < time.time():
                    return 200, {"active": False}
                return 200, {"active": True, "username": known.user}
            return 404, {"error": "not_found"}

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(timeout=2)
