"""Matcher parameters trained from steward labels: train, keep every version, use the newest.

`train` reads the labels (sync/labels.py), re-estimates the parameters from the shipped ones
(dedupe/training.py) and stores them as a new `model_params` row with its version
(`crmhub-fs-2+t3`: the third trained set on top of comparisons `crmhub-fs-2`) and provenance.
The pipeline's matcher uses the newest row that is not retired and was trained for the
comparisons this release runs (`use_active_params`, called by the sync engine at the start of
each run); with none it uses the shipped parameters. A row for older comparisons is ignored
until `crmhub dedupe train` runs again, because its levels may mean something else now.
Nothing is deleted: `rollback` retires the active row and the one before takes over.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from datetime import UTC, datetime
from functools import cache
from typing import Any, Literal

from croniter import croniter
from sqlalchemy import Connection, Engine, Row, func, select

from crmhub.settings import Settings
from dedupe.matcher import FellegiSunterMatcher
from dedupe.scoring import MODEL_VERSION, Params, default_params
from dedupe.training import (
    LevelChange,
    TrainingResult,
    level_changes,
    train_from_labels,
    trained_version,
)
from sync.labels import fingerprint, label_counts, labelled_pairs, load_labels
from sync.store import audit_log, model_params, write_transaction

__all__ = [
    "TrainOutcome",
    "active_params",
    "active_row",
    "history",
    "rollback",
    "scheduled_training",
    "train",
    "use_active_params",
]

log = logging.getLogger("crmhub.learning")

Status = Literal["trained", "dry_run", "too_few_labels", "unchanged"]


@dataclass(frozen=True, slots=True)
class TrainOutcome:
    """What `train` did, and what changed against the parameters active before."""

    status: Status
    labels: dict[str, int]
    min_labels: int
    previous_version: str
    version: str | None = None  # the new (or, on a dry run, would-be) version
    result: TrainingResult | None = None
    changes: tuple[LevelChange, ...] = ()  # against the previously active parameters

    def as_dict(self, top: int = 10) -> dict[str, Any]:
        out: dict[str, Any] = {
            "status": self.status,
            "labels": self.labels,
            "min_labels": self.min_labels,
            "previous_version": self.previous_version,
            "version": self.version,
        }
        if self.result is not None:
            out["prior_shift_bits"] = round(self.result.prior_shift, 3)
            out["match_rate"] = round(self.result.params.match_rate, 6)
            out["changes"] = [c.as_dict() for c in self.changes[:top]]
        return out


@cache
def _shipped_version() -> str:
    return default_params().version  # read once: this runs at every sync and webhook delivery


def active_row(conn: Connection) -> Row[Any] | None:
    """The newest trained parameter set in use: not retired, for these comparisons."""
    return conn.execute(
        select(model_params)
        .where(model_params.c.retired_at.is_(None), model_params.c.base_version == MODEL_VERSION)
        .order_by(model_params.c.id.desc())
        .limit(1)
    ).first()


def active_params(conn: Connection) -> Params:
    """The parameters the pipeline uses: the active trained set, else the shipped ones."""
    row = active_row(conn)
    return Params.from_json(row.params) if row is not None else default_params()


def use_active_params(db: Engine, matcher: object) -> str | None:
    """Point a Fellegi-Sunter `matcher` at the store's active parameters; returns their
    version (None for a matcher without parameters, such as the exact one)."""
    if not isinstance(matcher, FellegiSunterMatcher):
        return None
    with db.connect() as conn:
        row = active_row(conn)
        wanted = row.version if row is not None else _shipped_version()
        if matcher.version != wanted:
            params = Params.from_json(row.params) if row is not None else default_params()
            matcher.params, matcher.version = params, params.version
            log.info("matcher parameters switched", extra={"model": params.version})
    return wanted


def _same_training(row: Row[Any] | None, fp: str, settings: Settings) -> bool:
    if row is None or row.label_fingerprint != fp:
        return False
    made = Params.from_json(row.params).provenance
    m = settings.matching
    return bool(
        made.get("prior_strength") == m.train_prior_strength
        and made.get("shift_sd") == m.train_prior_shift_sd
    )


def train(
    db: Engine,
    settings: Settings,
    *,
    actor: str,
    dry_run: bool = False,
    force: bool = False,
) -> TrainOutcome:
    """Re-estimate the matcher from the steward labels and store the result as the newest
    parameters; does nothing with fewer than `[matching] train_min_labels` labels, or when
    neither the labels nor the training settings changed since the active set (`force`
    trains anyway)."""
    m = settings.matching
    with db.connect() as conn:
        labels = load_labels(conn)
        counts = label_counts(conn)
        current = active_row(conn)
        before = Params.from_json(current.params) if current is not None else default_params()
        if len(labels) < m.train_min_labels:
            return TrainOutcome("too_few_labels", counts, m.train_min_labels, before.version)
        fp = fingerprint(labels)
        if not force and _same_training(current, fp, settings):
            return TrainOutcome(
                "unchanged", counts, m.train_min_labels, before.version, before.version
            )
        base = default_params()
        pairs = labelled_pairs(conn, labels, base)
        top = conn.execute(select(func.coalesce(func.max(model_params.c.id), 0))).scalar_one()
    version = trained_version(int(top) + 1)
    result = train_from_labels(
        base,
        pairs.levels,
        pairs.is_match,
        version=version,
        offsets=pairs.offsets,
        prior_strength=m.train_prior_strength,
        shift_sd=m.train_prior_shift_sd,
        provenance={"label_fingerprint": fp, "trained_by": actor},
    )
    changes = tuple(level_changes(before, result.params, result.counts))
    outcome = TrainOutcome(
        "dry_run" if dry_run else "trained",
        counts,
        m.train_min_labels,
        before.version,
        version=version,
        result=result,
        changes=changes,
    )
    if dry_run:
        return outcome
    now = datetime.now(UTC)
    with write_transaction(db) as conn:
        conn.execute(
            model_params.insert().values(
                version=version,
                base_version=MODEL_VERSION,
                params=result.params.to_json(),
                labels_match=result.matches,
                labels_non_match=result.non_matches,
                label_fingerprint=fp,
                created_by=actor,
                created_at=now,
            )
        )
        conn.execute(
            audit_log.insert().values(
                at=now,
                actor=actor,
                action="model.train",
                details={
                    "version": version,
                    "previous_version": before.version,
                    "labels": {"match": result.matches, "non_match": result.non_matches},
                },
            )
        )
    log.info(
        "matcher trained",
        extra={"model": version, "matches": result.matches, "non_matches": result.non_matches},
    )
    return outcome


def rollback(db: Engine, actor: str) -> dict[str, Any]:
    """Retire the active trained parameters; the previous set (or the shipped one) takes over."""
    now = datetime.now(UTC)
    with write_transaction(db) as conn:
        row = active_row(conn)
        if row is None:
            return {"retired": None, "active": default_params().version}
        conn.execute(
            model_params.update().where(model_params.c.id == row.id).values(retired_at=now)
        )
        active = active_params(conn).version
        conn.execute(
            audit_log.insert().values(
                at=now,
                actor=actor,
                action="model.rollback",
                details={"retired": row.version, "active": active},
            )
        )
    return {"retired": row.version, "active": active}


def history(conn: Connection) -> list[dict[str, Any]]:
    """Every stored parameter set, newest first, with which one is active."""
    active = active_row(conn)
    return [
        {
            "version": r.version,
            "base_version": r.base_version,
            "labels": {"match": r.labels_match, "non_match": r.labels_non_match},
            "created_by": r.created_by,
            "created_at": r.created_at.isoformat(timespec="seconds"),
            "retired_at": r.retired_at.isoformat(timespec="seconds") if r.retired_at else None,
            "active": active is not None and r.id == active.id,
            "usable": r.base_version == MODEL_VERSION,
        }
        for r in conn.execute(select(model_params).order_by(model_params.c.id.desc()))
    ]


def scheduled_training(settings: Settings, db: Engine, minute: datetime) -> dict[str, Any]:
    """The worker's cron tick: train when `[matching] train_schedule` fires at `minute`."""
    expr = settings.matching.train_schedule
    if not expr or not croniter.match(expr, minute.replace(second=0, microsecond=0)):
        return {}
    outcome = train(db, settings, actor="scheduler")
    return outcome.as_dict(top=0)
