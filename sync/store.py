"""The unified store: schema (SQLAlchemy Core) and connection setup for SQLite and PostgreSQL.

The Alembic migrations in sync/migrations are the truth for the schema; this metadata mirrors
them for queries (a test compares the two). Repository functions live next to the code that
needs them (sync/staging.py, sync/queries.py); this module only knows tables and engines.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
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
    any_,
    bindparam,
    cast,
    create_engine,
    event,
    func,
    literal_column,
    select,
)
from sqlalchemy.dialects.postgresql import ARRAY, array
from sqlalchemy.engine import Dialect, make_url
from sqlalchemy.sql import Select
from sqlalchemy.sql.elements import ColumnElement
from sqlalchemy.types import TypeDecorator

__all__ = [
    "UTCDateTime",
    "activity",
    "activity_participant",
    "allocate_ids",
    "audit_log",
    "bulk_insert",
    "connector_state",
    "dead_letter",
    "golden_record",
    "inbox",
    "make_engine",
    "match_key",
    "membership",
    "merge_constraint",
    "metadata",
    "one_of",
    "review_item",
    "source_record",
    "sync_run",
    "write_transaction",
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
    UniqueConstraint("source", "kind", "external_id", name="uq_source_record_identity"),
)

match_key = Table(
    "match_key",
    metadata,
    Column("record_id", ForeignKey("source_record.id", ondelete="CASCADE"), primary_key=True),
    Column("key_kind", String(20), primary_key=True),
    Column("key_value", String(300), primary_key=True),
    Index("ix_match_key_lookup", "key_kind", "key_value"),
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

merge_constraint = Table(
    "merge_constraint",
    metadata,
    Column("record_a", ForeignKey("source_record.id", ondelete="CASCADE"), primary_key=True),
    Column("record_b", ForeignKey("source_record.id", ondelete="CASCADE"), primary_key=True),
    Column("kind", String(20), nullable=False),  # do_not_merge | must_merge
    Column("created_by", String(200)),
    Column("created_at", UTCDateTime(), nullable=False),
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


def _sqlite_pragmas(dbapi_connection: Any, _record: Any) -> None:
    # Autocommit at the driver: SQLAlchemy's "begin" event below issues BEGIN itself.
    dbapi_connection.isolation_level = None
    cursor = dbapi_connection.cursor()
    cursor.execute("PRAGMA journal_mode=WAL")
    cursor.execute("PRAGMA synchronous=NORMAL")
    cursor.execute("PRAGMA busy_timeout=30000")
    cursor.execute("PRAGMA foreign_keys=ON")
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
        engine = create_engine(parsed, json_serializer=_json_dumps, json_deserializer=orjson.loads)
        event.listen(engine, "connect", _sqlite_pragmas)
        event.listen(engine, "begin", _sqlite_begin)
        return engine
    if parsed.drivername == "postgresql":
        parsed = parsed.set(drivername="postgresql+psycopg")
    return create_engine(
        parsed, pool_pre_ping=True, json_serializer=_json_dumps, json_deserializer=orjson.loads
    )


def _json_dumps(value: Any) -> str:
    return orjson.dumps(value, default=str).decode()


def one_of(conn: Connection, column: Any, values: Sequence[Any]) -> ColumnElement[bool]:
    """`column IN values`, as one parameter whatever the length of the list.

    PostgreSQL: `= ANY(array)` (a long list of separate parameters is planned badly there).
    SQLite: `IN (SELECT value FROM json_each(?))` (compiling hundreds of parameters per
    statement costs more than running it).
    """
    if conn.dialect.name == "postgresql":
        return column == any_(cast(array(list(values)), ARRAY(column.type)))  # type: ignore[no-any-return]
    listed: Select[tuple[Any]] = select(literal_column("value")).select_from(
        func.json_each(bindparam(None, orjson.dumps(list(values)).decode(), String()))
    )
    return column.in_(listed)  # type: ignore[no-any-return]


def bulk_insert(conn: Connection, table: Table, rows: list[dict[str, Any]]) -> None:
    """INSERT many rows through the driver's executemany, skipping per-row statement
    compilation (the bulk of the cost of a Core executemany). Values still go through each
    column type's bind processor, so JSON and UTC datetimes are stored exactly as Core would.
    All rows must have the keys of the first row.
    """
    if not rows:
        return
    columns = list(rows[0])
    dialect = conn.dialect
    processors = [table.c[name].type.bind_processor(dialect) for name in columns]
    marker = "?" if dialect.paramstyle == "qmark" else "%s"
    sql = (
        f"INSERT INTO {table.name} ({', '.join(columns)}) "
        f"VALUES ({', '.join([marker] * len(columns))})"
    )
    params = [
        tuple(
            value if process is None or value is None else process(value)
            for value, process in zip((row[name] for name in columns), processors, strict=True)
        )
        for row in rows
    ]
    conn.exec_driver_sql(sql, params)


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
