"""The unified store: schema (SQLAlchemy Core) and connection setup for SQLite and PostgreSQL.

The Alembic migrations in sync/migrations are the truth for the schema; this metadata mirrors
them for queries (a test compares the two). Repository functions live next to the code that
needs them (sync/staging.py, sync/queries.py); this module only knows tables and engines.
"""

from __future__ import annotations

import sqlite3
import time
from collections.abc import Collection, Iterator, Sequence
from contextlib import contextmanager
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import orjson
from sqlalchemy import (
    JSON,
    BigInteger,
    Column,
    Connection,
    DateTime,
    Engine,
    Float,
    ForeignKey,
    Index,
    Integer,
    MetaData,
    String,
    Table,
    Text,
    UniqueConstraint,
    and_,
    any_,
    bindparam,
    create_engine,
    event,
    func,
    literal_column,
    select,
)
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.dialects.postgresql import ARRAY
from sqlalchemy.engine import Dialect, make_url
from sqlalchemy.sql import Select
from sqlalchemy.sql.elements import ColumnElement
from sqlalchemy.types import TypeDecorator

from crmhub.mapping import json_text

__all__ = [
    "UTCDateTime",
    "activity",
    "activity_participant",
    "allocate_ids",
    "api_token",
    "app_user",
    "audit_golden",
    "audit_log",
    "bind_values",
    "blank_overwrite",
    "bulk_insert",
    "connector_state",
    "contact_form",
    "dead_letter",
    "field_choice",
    "golden_record",
    "inbox",
    "insert_rows",
    "insert_rows_at_once",
    "json_text",
    "key_frequency",
    "live_contact",
    "login_failure",
    "make_engine",
    "match_key",
    "membership",
    "merge_constraint",
    "metadata",
    "model_params",
    "one_of",
    "outbox",
    "pending_match",
    "review_item",
    "source_record",
    "store_secret",
    "suppression",
    "sync_run",
    "update_rows",
    "update_rows_at_once",
    "upsert",
    "web_session",
    "write_transaction",
    "writeback_ledger",
]


class UTCDateTime(TypeDecorator[datetime]):
    """Timezone-aware UTC datetimes on both back ends (SQLite keeps no zone of its own)."""

    impl = DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            raise ValueError("naive datetime given to the store; use UTC-aware datetimes")
        return value.astimezone(UTC)

    def process_result_value(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)


metadata = MetaData()
_ID = BigInteger().with_variant(Integer, "sqlite")  # SQLite rowid aliases need INTEGER

connector_state = Table(
    "connector_state",
    metadata,
    Column("connector", String(200), primary_key=True),
    Column("stream", String(50), primary_key=True),
    Column("cursor", JSON, nullable=True),
    Column("updated_at", UTCDateTime(), nullable=False),
)

sync_run = Table(
    "sync_run",
    metadata,
    Column("id", _ID, primary_key=True, autoincrement=True),
    Column("connector", String(200), nullable=False, index=True),
    # queued | running | retrying | succeeded | failed | interrupted
    Column("state", String(20), nullable=False),
    Column("full_refresh", Integer, nullable=False, default=0),
    Column("started_at", UTCDateTime(), nullable=False),
    Column("finished_at", UTCDateTime()),
    Column("counts", JSON, nullable=False, default=dict),
    Column("error", Text),
)

source_record = Table(
    "source_record",
    metadata,
    Column("id", _ID, primary_key=True, autoincrement=True),
    Column("source", String(200), nullable=False),
    Column("kind", String(20), nullable=False),  # contact | activity
    Column("external_id", String(500), nullable=False),
    Column("content_hash", String(64), nullable=False),
    Column("payload", JSON, nullable=False),
    Column("data", JSON, nullable=False),  # the mapped Contact / Activity
    Column("source_updated_at", UTCDateTime()),
    Column("staged_at", UTCDateTime(), nullable=False),
    Column("deleted", Integer, nullable=False, default=0),
    # A contact the source merged into another (migration 0010_source_alias): the survivor's
    # external id; the record is also flagged deleted (sync/aliases.py).
    Column("alias_of", String(500), nullable=True),
    UniqueConstraint("source", "kind", "external_id", name="uq_source_record_identity"),
)
Index(
    "ix_source_record_alias_of",
    source_record.c.source,
    source_record.c.alias_of,
    sqlite_where=source_record.c.alias_of.is_not(None),
    postgresql_where=source_record.c.alias_of.is_not(None),
)
# The store's live contacts, counted by every process every 10 minutes (`StoreFrequencies`,
# inside a page's write transaction) and by `crmhub status`: an index of their ids alone, so
# the count reads it (27 ms at 1M contacts on SQLite) instead of every row (140 ms).
live_contact = and_(source_record.c.kind == "contact", source_record.c.deleted == 0)
Index(
    "ix_source_record_live_contact",
    source_record.c.id,
    sqlite_where=live_contact,
    postgresql_where=live_contact,
)

match_key = Table(
    "match_key",
    metadata,
    Column("record_id", ForeignKey("source_record.id", ondelete="CASCADE"), primary_key=True),
    Column("key_kind", String(20), primary_key=True),
    Column("key_value", String(300), primary_key=True),
    Index("ix_match_key_lookup", "key_kind", "key_value"),
    # SQLite: the primary key is the table (two b-trees per key row instead of three).
    sqlite_with_rowid=False,
)

# Each contact's prepared form (`dedupe.normalize.Prepared` as JSON), written with its
# match_key rows and valid for the data whose digest it carries (sync/forms.py): candidates
# are read back prepared instead of being validated and prepared again for every probe.
contact_form = Table(
    "contact_form",
    metadata,
    Column("record_id", ForeignKey("source_record.id", ondelete="CASCADE"), primary_key=True),
    Column("digest", String(16), nullable=False),
    Column("form", Text, nullable=False),
)

# How many match_key rows hold each common (key_kind, key_value), counted when the store held
# `contacts` live contacts: counting "john" walks thousands of index entries, so counts of
# common values are kept across processes (sync/frequencies.py).
key_frequency = Table(
    "key_frequency",
    metadata,
    Column("key_kind", String(20), primary_key=True),
    Column("key_value", String(300), primary_key=True),
    Column("holders", Integer, nullable=False),
    Column("contacts", Integer, nullable=False),
)

golden_record = Table(
    "golden_record",
    metadata,
    Column("id", _ID, primary_key=True, autoincrement=True),
    Column("fields", JSON, nullable=False),
    Column("lineage", JSON, nullable=False),
    Column("version", Integer, nullable=False, default=1),
    Column("merged_into", ForeignKey("golden_record.id"), nullable=True, index=True),
    Column("created_at", UTCDateTime(), nullable=False),
    Column("updated_at", UTCDateTime(), nullable=False),
)

membership = Table(
    "membership",
    metadata,
    Column("record_id", ForeignKey("source_record.id", ondelete="CASCADE"), primary_key=True),
    Column("golden_id", ForeignKey("golden_record.id"), nullable=False, index=True),
    Column("method", String(30), nullable=False),  # new | auto | steward
    Column("probability", Float),
    Column("decided_at", UTCDateTime(), nullable=False),
)

activity = Table(
    "activity",
    metadata,
    Column("record_id", ForeignKey("source_record.id", ondelete="CASCADE"), primary_key=True),
    Column("type", String(50), nullable=False),
    Column("occurred_at", UTCDateTime(), nullable=False, index=True),
    Column("subject", Text),
)

activity_participant = Table(
    "activity_participant",
    metadata,
    Column("record_id", ForeignKey("source_record.id", ondelete="CASCADE"), primary_key=True),
    Column("email_key", String(300), primary_key=True),
    Index("ix_activity_participant_email", "email_key"),
)

review_item = Table(
    "review_item",
    metadata,
    Column("id", _ID, primary_key=True, autoincrement=True),
    Column("record_a", ForeignKey("source_record.id", ondelete="CASCADE"), nullable=False),
    Column("record_b", ForeignKey("source_record.id", ondelete="CASCADE"), nullable=False),
    Column("probability", Float, nullable=False),
    Column("explanation", JSON, nullable=False),
    Column("status", String(20), nullable=False, default="open"),
    Column("decided_by", String(200)),
    Column("decided_at", UTCDateTime()),
    Column("created_at", UTCDateTime(), nullable=False),
    UniqueConstraint("record_a", "record_b", name="uq_review_pair"),
)
# The steward queue: open items, best first (migration 0002_steward); by age (0009).
Index("ix_review_item_queue", review_item.c.status, review_item.c.probability)
Index("ix_review_item_age", review_item.c.status, review_item.c.created_at)

merge_constraint = Table(
    "merge_constraint",
    metadata,
    Column("record_a", ForeignKey("source_record.id", ondelete="CASCADE"), primary_key=True),
    Column("record_b", ForeignKey("source_record.id", ondelete="CASCADE"), primary_key=True),
    Column("kind", String(20), nullable=False),  # do_not_merge | must_merge
    Column("created_by", String(200)),
    Column("created_at", UTCDateTime(), nullable=False),
    # What the decision rested on (sync/constraints.py, migration 0005_constraint_evidence):
    # each record's normalised identity then; NULL for decisions older than the migration.
    Column("evidence", JSON, nullable=True),
    # Set when that evidence changed materially since: the steward's reason to look again,
    # and a key of the change it was re-queued for (so one change re-queues once).
    Column("stale_reason", Text, nullable=True),
    Column("stale_key", String(64), nullable=True),
    Column("stale_at", UTCDateTime(), nullable=True, index=True),
    Index("ix_merge_constraint_record_b", "record_b"),
)

audit_log = Table(
    "audit_log",
    metadata,
    Column("id", _ID, primary_key=True, autoincrement=True),
    Column("at", UTCDateTime(), nullable=False),
    Column("actor", String(200), nullable=False),
    Column("action", String(50), nullable=False),
    Column("details", JSON, nullable=False),
)

# Which golden records each steward action touched (sync/history.py, migration
# 0008_audit_golden): a golden record's history without reading the whole audit log.
audit_golden = Table(
    "audit_golden",
    metadata,
    Column("golden_id", _ID, primary_key=True),
    Column("audit_id", _ID, ForeignKey("audit_log.id", ondelete="CASCADE"), primary_key=True),
)

dead_letter = Table(
    "dead_letter",
    metadata,
    Column("id", _ID, primary_key=True, autoincrement=True),
    Column("run_id", ForeignKey("sync_run.id"), nullable=True, index=True),
    Column("source", String(200), nullable=False, index=True),
    Column("scope", String(10), nullable=False),  # record | field
    Column("origin", String(500), nullable=False),  # file:line or external id
    Column("field", String(100)),
    Column("reason", Text, nullable=False),
    Column("raw", Text),
    Column("created_at", UTCDateTime(), nullable=False),
)

# Pushed deliveries (webhooks, hosted forms), written and committed before the sender gets its
# 2xx; processed afterwards. UNIQUE (connector, delivery_id) makes a replay a no-op.
inbox = Table(
    "inbox",
    metadata,
    Column("id", _ID, primary_key=True, autoincrement=True),
    Column("connector", String(200), nullable=False),
    Column("delivery_id", String(200), nullable=False),
    Column("received_at", UTCDateTime(), nullable=False),
    Column("content_type", String(100), nullable=False),
    Column("body", Text, nullable=False),  # the raw delivery, as signed
    Column("status", String(20), nullable=False, index=True),  # pending | done | failed
    Column("attempts", Integer, nullable=False, default=0),
    Column("claimed_at", UTCDateTime()),
    Column("processed_at", UTCDateTime()),
    Column("error", Text),
    UniqueConstraint("connector", "delivery_id", name="uq_inbox_delivery"),
)


# Steward workspace (migration 0002_steward): users, their credentials, field choices.
app_user = Table(
    "app_user",
    metadata,
    Column("id", _ID, primary_key=True, autoincrement=True),
    Column("name", String(100), nullable=False, unique=True),
    Column("password_hash", String(200), nullable=False),
    Column("role", String(20), nullable=False),  # viewer | steward | admin
    Column("disabled", Integer, nullable=False, default=0),
    Column("created_at", UTCDateTime(), nullable=False),
)

api_token = Table(
    "api_token",
    metadata,
    Column("id", _ID, primary_key=True, autoincrement=True),
    Column("user_id", ForeignKey("app_user.id", ondelete="CASCADE"), nullable=False, index=True),
    Column("token_hash", String(64), nullable=False, unique=True),  # sha256 of the token
    Column("label", String(100), nullable=False),
    Column("created_at", UTCDateTime(), nullable=False),
    Column("last_used_at", UTCDateTime()),
)

web_session = Table(
    "web_session",
    metadata,
    Column("id_hash", String(64), primary_key=True),  # sha256 of the cookie value
    Column("user_id", ForeignKey("app_user.id", ondelete="CASCADE"), nullable=False, index=True),
    Column("csrf_token", String(64), nullable=False),
    Column("created_at", UTCDateTime(), nullable=False),
    Column("expires_at", UTCDateTime(), nullable=False),
)

field_choice = Table(
    "field_choice",
    metadata,
    Column("golden_id", ForeignKey("golden_record.id"), primary_key=True),
    Column("field", String(100), primary_key=True),
    Column("record_id", ForeignKey("source_record.id", ondelete="CASCADE"), nullable=False),
    Column("created_by", String(200), nullable=False),
    Column("created_at", UTCDateTime(), nullable=False),
)

# Erasure (sync/erasure.py): keyed hashes of erased identities, and the store's own key.
suppression = Table(
    "suppression",
    metadata,
    Column("hash", String(64), primary_key=True),  # HMAC-SHA256, keyed by store_secret
    Column("created_by", String(200), nullable=False),
    Column("created_at", UTCDateTime(), nullable=False),
)

store_secret = Table(
    "store_secret",
    metadata,
    Column("name", String(50), primary_key=True),
    Column("value", String(200), nullable=False),
    Column("created_at", UTCDateTime(), nullable=False),
)

# Sign-in throttling (sync/users.py, migration 0007_login_failure): failed sign-ins, shared by
# every web process. A SHA-256 of the throttled key (user name, client address) only.
login_failure = Table(
    "login_failure",
    metadata,
    Column("id", _ID, primary_key=True, autoincrement=True),
    Column("key_hash", String(64), nullable=False),
    Column("at", UTCDateTime(), nullable=False, index=True),
    Index("ix_login_failure_key", "key_hash", "at"),
)


# First loads clustered in one batch (sync/first_load.py, migration 0011_pending_match):
# sources whose staged contacts wait for that batch.
pending_match = Table(
    "pending_match",
    metadata,
    Column("source", String(200), primary_key=True),
    Column("since", UTCDateTime(), nullable=False),
)


# Write-back (sync/outbox.py): pushes to connected tools, committed with the change that
# needs them, delivered at least once by the relay.
outbox = Table(
    "outbox",
    metadata,
    Column("id", _ID, primary_key=True, autoincrement=True),
    Column("connector", String(200), nullable=False),  # the recipient
    Column("action", String(20), nullable=False),  # consent | fields | erase
    Column("golden_id", _ID, nullable=True, index=True),  # no FK: erasure outlives the row
    Column("dedupe_key", String(300), nullable=False),
    Column("payload", JSON, nullable=False),  # what to push; scrubbed once an erase is sent
    Column("status", String(20), nullable=False),  # pending | sent | failed
    Column("attempts", Integer, nullable=False, default=0),
    Column("next_attempt_at", UTCDateTime(), nullable=False),
    Column("locked_until", UTCDateTime(), nullable=True),
    Column("last_error", Text),
    Column("created_at", UTCDateTime(), nullable=False),
    Column("sent_at", UTCDateTime()),
    Index("ix_outbox_due", "status", "next_attempt_at"),
    Index("ix_outbox_dedupe", "dedupe_key"),
)

# What each recipient was last told per golden record and field (a keyed value hash, not
# the value): echo suppression, and the GDPR Art. 19 "disclosed-to" ledger.
writeback_ledger = Table(
    "writeback_ledger",
    metadata,
    Column("connector", String(200), primary_key=True),
    Column("golden_id", _ID, primary_key=True),
    Column("field", String(100), primary_key=True),
    Column("value_hash", String(64), nullable=False),
    Column("pushed_at", UTCDateTime(), nullable=False),
)


# Matcher parameters trained from steward labels (sync/model_params.py, migration
# 0003_model_params). The newest row not retired, of the running comparisons' version, is used.
model_params = Table(
    "model_params",
    metadata,
    Column("id", _ID, primary_key=True, autoincrement=True),
    Column("version", String(100), nullable=False),
    Column("base_version", String(50), nullable=False),  # dedupe.scoring.MODEL_VERSION then
    Column("params", Text, nullable=False),  # Params.to_json()
    Column("labels_match", Integer, nullable=False),
    Column("labels_non_match", Integer, nullable=False),
    Column("label_fingerprint", String(64), nullable=False),
    Column("created_by", String(200), nullable=False),
    Column("created_at", UTCDateTime(), nullable=False),
    Column("retired_at", UTCDateTime()),
    UniqueConstraint("version", name="uq_model_params_version"),
)


# Data quality (sync/blanks.py, migration 0004_blank_overwrite): a re-staged contact lost a
# field's value. Ids and the field name only, never the value (the record holds the rest).
blank_overwrite = Table(
    "blank_overwrite",
    metadata,
    Column("id", _ID, primary_key=True, autoincrement=True),
    Column("source", String(200), nullable=False),
    Column(
        "record_id",
        _ID,
        ForeignKey("source_record.id", ondelete="CASCADE"),
        nullable=False,
        index=True,
    ),
    Column("external_id", String(500), nullable=False),
    Column("field", String(100), nullable=False),
    Column("run_id", _ID, ForeignKey("sync_run.id"), nullable=True),
    Column("detected_at", UTCDateTime(), nullable=False),
    Index("ix_blank_overwrite_source", "source", "detected_at"),
)


_SQLITE_BUSY_MS = 30000


def _use_wal(cursor: Any) -> None:
    """Switch the file to WAL (persistent, so usually already done).

    The switch needs an exclusive lock and SQLite may answer "database is locked" at once
    instead of waiting on busy_timeout, so processes opening a fresh store together retry.
    """
    deadline = time.monotonic() + _SQLITE_BUSY_MS / 1000
    while True:
        try:
            if cursor.execute("PRAGMA journal_mode").fetchone()[0] == "wal":
                return
            cursor.execute("PRAGMA journal_mode=WAL")
            return
        except sqlite3.OperationalError as exc:
            if "locked" not in str(exc) or time.monotonic() > deadline:
                raise
            time.sleep(0.02)


def _sqlite_pragmas(dbapi_connection: Any, _record: Any) -> None:
    # Autocommit at the driver: SQLAlchemy's "begin" event below issues BEGIN itself.
    dbapi_connection.isolation_level = None
    cursor = dbapi_connection.cursor()
    cursor.execute(f"PRAGMA busy_timeout={_SQLITE_BUSY_MS}")
    _use_wal(cursor)
    cursor.execute("PRAGMA synchronous=NORMAL")
    cursor.execute("PRAGMA foreign_keys=ON")
    # 64 MiB of page cache (default 2 MiB): bulk loads update several indexes per row, and
    # with the small default cache most of those updates re-read pages from the OS.
    cursor.execute("PRAGMA cache_size=-65536")
    # Checkpoint the WAL into the database every ~40 MB instead of every 4 MB: a bulk load
    # otherwise copies each page back several times; the file is trimmed to 64 MB afterwards.
    cursor.execute("PRAGMA wal_autocheckpoint=10000")
    cursor.execute("PRAGMA journal_size_limit=67108864")
    cursor.close()


def _sqlite_begin(conn: Connection) -> None:
    # Writers take the lock up front, so two writers queue on busy_timeout instead of one
    # failing with "database is locked" when its read lock cannot be upgraded.
    mode = "IMMEDIATE" if conn.get_execution_options().get("write") else "DEFERRED"
    conn.exec_driver_sql(f"BEGIN {mode}")


def make_engine(url: str, base_dir: Path | None = None) -> Engine:
    """An engine for `url`; relative SQLite paths resolve against `base_dir`."""
    parsed = make_url(url)
    if parsed.get_backend_name() == "sqlite":
        database = parsed.database or ""
        if database and database != ":memory:" and not Path(database).is_absolute():
            resolved = (base_dir or Path.cwd()) / database
            resolved.parent.mkdir(parents=True, exist_ok=True)
            parsed = parsed.set(database=str(resolved))
        engine = create_engine(parsed, json_serializer=json_text, json_deserializer=orjson.loads)
        event.listen(engine, "connect", _sqlite_pragmas)
        event.listen(engine, "begin", _sqlite_begin)
        return engine
    if parsed.drivername == "postgresql":
        parsed = parsed.set(drivername="postgresql+psycopg")
    return create_engine(
        parsed, pool_pre_ping=True, json_serializer=json_text, json_deserializer=orjson.loads
    )


def one_of(conn: Connection, column: Any, values: Sequence[Any]) -> ColumnElement[bool]:
    """`column IN values`, as one parameter whatever the length of the list.

    PostgreSQL: `= ANY(array)` (a long list of separate parameters is planned badly there).
    SQLite: `IN (SELECT value FROM json_each(?))` (compiling hundreds of parameters per
    statement costs more than running it).
    """
    if conn.dialect.name == "postgresql":
        array_of = bindparam(None, list(values), type_=ARRAY(column.type))
        return column == any_(array_of)  # type: ignore[no-any-return]
    listed: Select[tuple[Any]] = select(literal_column("value")).select_from(
        func.json_each(bindparam(None, orjson.dumps(list(values)).decode(), String()))
    )
    return column.in_(listed)  # type: ignore[no-any-return]


def bulk_insert(
    conn: Connection, table: Table, rows: list[dict[str, Any]], encoded: Collection[str] = ()
) -> None:
    """INSERT many rows through the driver's executemany, skipping per-row statement
    compilation (the bulk of the cost of a Core executemany). Values still go through each
    column type's bind processor, so JSON and UTC datetimes are stored exactly as Core would,
    except the JSON columns named in `encoded`, whose values are already `json_text`.
    All rows must have the keys of the first row.
    """
    if not rows:
        return
    columns = list(rows[0])
    dialect = conn.dialect
    # Column by column: one converter per column instead of a generator per row.
    values = [
        [row[name] for row in rows]
        if name in encoded
        else _bound([row[name] for row in rows], table.c[name].type, dialect)
        for name in columns
    ]
    insert_rows(conn, table, columns, list(zip(*values, strict=True)))


def upsert(conn: Connection, table: Table) -> postgresql.Insert | sqlite.Insert:
    """An INSERT into `table` in `conn`'s dialect, which takes ON CONFLICT clauses
    (`on_conflict_do_update`, `on_conflict_do_nothing`) and names the new row `excluded`."""
    return (postgresql.insert if conn.dialect.name == "postgresql" else sqlite.insert)(table)


def insert_rows(
    conn: Connection, table: Table, columns: Sequence[str], rows: list[tuple[Any, ...]]
) -> None:
    """`bulk_insert` for the hot path: tuples in `columns` order whose values are already as
    the driver takes them (`bind_values`, `json_text`), so nothing is converted or copied.
    On PostgreSQL the rows stream through COPY, several times cheaper than an executemany
    on both sides of the connection."""
    if not rows:
        return
    if conn.dialect.name == "postgresql":
        cursor = conn.connection.driver_connection.cursor()  # type: ignore[union-attr]
        with cursor, cursor.copy(f"COPY {table.name} ({', '.join(columns)}) FROM STDIN") as copy:
            for row in rows:
                copy.write_row(row)
        return
    marker = _marker(conn)
    sql = (
        f"INSERT INTO {table.name} ({', '.join(columns)}) "
        f"VALUES ({', '.join([marker] * len(columns))})"
    )
    conn.exec_driver_sql(sql, rows)


def update_rows(
    conn: Connection,
    table: Table,
    columns: Sequence[str],
    key: str,
    rows: list[tuple[Any, ...]],
    *,
    also: str = "",
) -> None:
    """`insert_rows`' counterpart: `UPDATE table SET column = value, ...[, also] WHERE key =
    value` for each row of driver-ready values, the key's last. Several times cheaper than a
    Core `update()` with a dict per row, whose parameters are built and processed row by row."""
    if not rows:
        return
    marker = _marker(conn)
    assignments = [f"{column} = {marker}" for column in columns] + ([also] if also else [])
    conn.exec_driver_sql(
        f"UPDATE {table.name} SET {', '.join(assignments)} WHERE {key} = {marker}", rows
    )


def insert_rows_at_once(
    conn: Connection, table: Table, columns: Sequence[str], rows: list[tuple[Any, ...]]
) -> None:
    """`insert_rows` for a thread writing beside a busy one. On SQLite the rows travel as one
    JSON text that `json_each` unpacks: one statement, run without the GIL. An executemany
    takes the GIL back after every row, and waits for it (up to the 5 ms switch interval)
    while the other thread computes. PostgreSQL: `insert_rows` (COPY)."""
    if not rows:
        return
    if conn.dialect.name != "sqlite":
        insert_rows(conn, table, columns, rows)
        return
    picks = ", ".join(f"json_extract(value, '$[{i}]')" for i in range(len(columns)))
    conn.exec_driver_sql(
        f"INSERT INTO {table.name} ({', '.join(columns)}) SELECT {picks} FROM json_each(?)",
        (orjson.dumps(rows).decode(),),
    )


def update_rows_at_once(
    conn: Connection,
    table: Table,
    columns: Sequence[str],
    key: str,
    rows: list[tuple[Any, ...]],
    *,
    also: str = "",
) -> None:
    """`update_rows` as one statement on SQLite (`UPDATE ... FROM json_each`), for the same
    reason as `insert_rows_at_once`; PostgreSQL: `update_rows`."""
    if not rows:
        return
    if conn.dialect.name != "sqlite":
        update_rows(conn, table, columns, key, rows, also=also)
        return
    assignments = [f"{c} = json_extract(j.value, '$[{i}]')" for i, c in enumerate(columns)]
    conn.exec_driver_sql(
        f"UPDATE {table.name} SET {', '.join(assignments + ([also] if also else []))} "
        f"FROM json_each(?) AS j WHERE {table.name}.{key} = "
        f"json_extract(j.value, '$[{len(columns)}]')",
        (orjson.dumps(rows).decode(),),
    )


def _marker(conn: Connection) -> str:
    return "?" if conn.dialect.paramstyle == "qmark" else "%s"


def bind_values(conn: Connection, column: Any, values: list[Any]) -> list[Any]:
    """`values` of `column` as the driver takes them (its type's bind processor), for
    `insert_rows`."""
    return _bound(values, column.type, conn.dialect)


def _bound(values: list[Any], type_: Any, dialect: Dialect) -> list[Any]:
    """`values` as the driver wants them: through the column type's bind processor."""
    process = type_.bind_processor(dialect)
    if process is None:
        return values
    if isinstance(type_, JSON):
        return [None if v is None else json_text(v) for v in values]
    if isinstance(type_, UTCDateTime):
        # sqlite3 would turn each datetime into text row by row (its default adapter); pages
        # stamp many rows with the same instant, so convert each distinct value once here.
        as_text = dialect.name == "sqlite"
        seen: dict[datetime, Any] = {}
        out: list[Any] = []
        for v in values:
            if v is None:
                out.append(None)
                continue
            found = seen.get(v)
            if found is None:
                found = process(v)
                found = seen[v] = found.isoformat(" ") if as_text else found
            out.append(found)
        return out
    return [None if v is None else process(v) for v in values]


def allocate_ids(conn: Connection, table: Table, count: int) -> list[int]:
    """Reserve `count` primary keys of `table` for a bulk insert with explicit ids.

    Multi-row INSERT ... RETURNING cannot promise row order on every back end, so bulk
    inserts take their ids up front: from the sequence on PostgreSQL, and above MAX(id) on
    SQLite, where the write transaction (BEGIN IMMEDIATE) already excludes other writers.
    """
    if count <= 0:
        return []
    if conn.dialect.name == "postgresql":
        rows = conn.exec_driver_sql(
            f"SELECT nextval(pg_get_serial_sequence('{table.name}', 'id')) "
            f"FROM generate_series(1, {int(count)})"
        )
        return [int(r[0]) for r in rows]
    top = conn.execute(select(func.coalesce(func.max(table.c.id), 0))).scalar_one()
    return list(range(int(top) + 1, int(top) + 1 + count))


@contextmanager
def write_transaction(engine: Engine) -> Iterator[Connection]:
    """One write transaction (BEGIN IMMEDIATE on SQLite); commits on success."""
    with engine.connect().execution_options(write=True) as conn, conn.begin():
        yield conn
