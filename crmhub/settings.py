"""Settings: one TOML file plus `CRMHUB_*` environment overrides, validated by pydantic.

`load_settings(path)` is the only entry point; nothing is read at import time. Strings may
refer to the environment as `${NAME}` (or `${NAME:-default}`), which is how secrets stay out of
the file. Unknown keys are errors that name the key and suggest the closest known one.
"""

from __future__ import annotations

import difflib
import os
import re
import tomllib
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator
from pydantic_settings import (
    BaseSettings,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
)

from crmhub.errors import SettingsError
from crmhub.records import SCALAR_CONTACT_FIELDS

__all__ = [
    "DEFAULT_CONFIG",
    "MatchingSettings",
    "QueueSettings",
    "Settings",
    "StoreSettings",
    "SurvivorshipSettings",
    "describe_validation_error",
    "expand_env",
    "load_settings",
]

DEFAULT_CONFIG = "crmhub.toml"
_ENV_REF = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(?::-([^}]*))?\}")


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid")


class StoreSettings(_Section):
    url: str = Field(
        "sqlite:///crmhub.db",
        description="SQLAlchemy URL: sqlite:///PATH or postgresql+psycopg://user@host/db",
    )


class QueueSettings(_Section):
    redis_url: str = Field("redis://127.0.0.1:6379/0", description="arq's Redis")
    namespace: str = Field(
        "", description="prefix of the queue, job ids and lock keys (one Redis, many installs)"
    )
    job_timeout: float = Field(3600, gt=0, description="seconds one sync job may run")
    max_tries: int = Field(5, ge=1, description="attempts per job, transient errors included")
    retry_backoff: float = Field(
        30, ge=0, description="seconds before retry 1; doubles per try (at least retry_after)"
    )
    lease_seconds: float = Field(
        30, gt=0, description="per-connector lock TTL; renewed every third; expires on death"
    )
    max_jobs: int = Field(4, ge=1, description="concurrent jobs per worker process")
    health_check_interval: float = Field(10, gt=0, description="seconds between heartbeats")


class MatchingSettings(_Section):
    method: Literal["probabilistic", "exact"] = Field(
        "probabilistic",
        description="probabilistic: fuzzy Fellegi-Sunter matching; exact: same email key or phone",
    )
    auto_merge: float = Field(0.95, ge=0, le=1, description="merge at or above this probability")
    review: float = Field(0.80, ge=0, le=1, description="queue for review at or above this")
    default_region: str = Field("US", description="ISO country for phones without +prefix")
    # Learning from steward decisions (`crmhub dedupe train`, dedupe/training.py).
    train_min_labels: int = Field(
        20, ge=1, description="steward decisions needed before training changes anything"
    )
    train_prior_strength: float = Field(
        100.0,
        gt=0,
        description="labels at which observed level shares and the shipped m weigh equally",
    )
    train_prior_shift_sd: float = Field(
        0.0, ge=0, description="bits; > 0 recalibrates the prior on the labels (0 = off)"
    )
    train_schedule: str | None = Field(
        None, description="cron expression (UTC) for retraining in `crmhub worker`; unset = never"
    )
    rebuild_max_moved_share: float = Field(
        0.05,
        ge=0,
        le=1,
        description="`crmhub rebuild` refuses without --yes when it would move more than this "
        "share of contacts to another golden record",
    )
    batch_first_load: int = Field(
        5_000,
        ge=0,
        description="a run into a store with no golden record yet that has staged this many "
        "contacts stages the rest without matching and clusters the store in one batch at the "
        "end of its contacts (probabilistic matcher; 0: always match page by page)",
    )

    recluster_growth: float = Field(
        0.1,
        ge=0,
        le=10,
        description="the store is clustered again in one batch when it reaches 2,000 contacts "
        "and each time it has grown by this share since (probabilistic matcher), so records "
        "decided one at a time weigh as a batch of the same records would; 0: only at 2,000",
    )

    recheck_growth: float = Field(
        0.01,
        ge=0,
        le=1,
        description="each time the store has grown by this share since its last batch or "
        "recheck, the golden records a borderline merge link made (within 0.03 of auto_merge) "
        "and the open review items within 0.03 below it are decided again with the store's size "
        "and counts (probabilistic matcher); 0: never",
    )

    @field_validator("recluster_growth")
    @classmethod
    def _growth(cls, value: float) -> float:
        if 0 < value < 0.01:
            raise ValueError(
                f"{value} would re-cluster the store almost every page: use 0.01 or more (0.1 "
                "is the default), or 0 to cluster it in one batch only at 2,000 contacts"
            )
        return value

    @field_validator("recheck_growth")
    @classmethod
    def _recheck(cls, value: float) -> float:
        if 0 < value < 0.002:
            raise ValueError(
                f"{value} would decide the borderline again almost every page: use 0.002 or "
                "more (0.01 is the default), or 0 to never do it"
            )
        return value

    @field_validator("train_schedule")
    @classmethod
    def _cron(cls, value: str | None) -> str | None:
        from croniter import croniter

        if value and not croniter.is_valid(value):
            raise ValueError(
                f"{value!r} is not a cron expression (five fields: minute hour day-of-month "
                "month day-of-week, e.g. '0 3 * * *' for 03:00 UTC daily)"
            )
        return value or None


SurvivorshipRule = Literal["most_recent", "most_complete", "most_frequent", "source_priority"]


class SurvivorshipSettings(_Section):
    default: SurvivorshipRule = Field(
        "most_recent",
        description="rule for fields not listed: most_recent | most_complete | most_frequent "
        "| source_priority",
    )
    fields: dict[str, SurvivorshipRule] = Field(
        default_factory=dict, description="rule per golden field, e.g. job_title = 'most_recent'"
    )
    source_priority: list[str] = Field(
        default_factory=list, description="connector names, most trusted first (source_priority)"
    )

    @field_validator("fields")
    @classmethod
    def _known_fields(cls, value: dict[str, str]) -> dict[str, str]:
        # Every scalar field but consent (always most restrictive); as in dedupe.survivorship.
        ruled = [f for f in SCALAR_CONTACT_FIELDS if f != "consent"]
        for name in value:
            if name not in ruled:
                close = difflib.get_close_matches(name, ruled, n=1)
                hint = f" (did you mean {close[0]!r}?)" if close else ""
                raise ValueError(
                    f"no golden field {name!r}{hint}; fields with a rule: "
                    f"{', '.join(ruled)} (consent is always most restrictive, "
                    "emails and phones keep every value)"
                )
        return value

    @model_validator(mode="after")
    def _priority_given(self) -> SurvivorshipSettings:
        uses = self.default == "source_priority" or "source_priority" in self.fields.values()
        if uses and not self.source_priority:
            raise ValueError(
                "the source_priority rule needs [survivorship] source_priority = "
                '["connector", ...] (most trusted first)'
            )
        return self


class Settings(BaseSettings):
    """The whole configuration. `connectors` tables are validated per kind later on."""

    model_config = SettingsConfigDict(
        env_prefix="CRMHUB_", env_nested_delimiter="__", extra="forbid"
    )

    store: StoreSettings = Field(default_factory=StoreSettings)
    queue: QueueSettings = Field(default_factory=QueueSettings)
    matching: MatchingSettings = Field(default_factory=MatchingSettings)
    survivorship: SurvivorshipSettings = Field(default_factory=SurvivorshipSettings)
    mappings_dir: Path | None = Field(None, description="extra folder searched for mappings")
    connectors: dict[str, dict[str, Any]] = Field(default_factory=dict)
    # Where the settings came from; relative paths in connector tables resolve against it.
    source_path: Path | None = Field(None, exclude=True)

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        # Environment wins over the file; no dotenv or secrets-dir magic.
        return (env_settings, init_settings)

    @property
    def base_dir(self) -> Path:
        return self.source_path.parent if self.source_path else Path.cwd()

    def resolve_path(self, value: str | Path) -> Path:
        """A path from config, relative to the config file's folder."""
        path = Path(value).expanduser()
        return path if path.is_absolute() else self.base_dir / path


def expand_env(value: Any, where: str, file: str) -> Any:
    """Replace `${NAME}` references in every string of a parsed TOML tree."""
    if isinstance(value, dict):
        return {k: expand_env(v, f"{where}.{k}" if where else k, file) for k, v in value.items()}
    if isinstance(value, list):
        return [expand_env(v, f"{where}[{i}]", file) for i, v in enumerate(value)]
    if not isinstance(value, str) or "${" not in value:
        return value

    def substitute(match: re.Match[str]) -> str:
        name, default = match.group(1), match.group(2)
        if name in os.environ:
            return os.environ[name]
        if default is not None:
            return default
        raise SettingsError(
            f"{file}: {where} refers to ${{{name}}}, which is not set in the environment. "
            f"Export {name} (or write ${{{name}:-default}} for a fallback).",
            file=file,
            key=where,
        )

    return _ENV_REF.sub(substitute, value)


def describe_validation_error(
    err: ValidationError, file: str, model: type[BaseModel], prefix: str = ""
) -> SettingsError:
    """Turn pydantic's error into one message naming the file, every bad key and a fix."""
    lines = []
    keys = []
    for item in err.errors():
        loc = [str(p) for p in item["loc"]]
        key = ".".join([prefix, *loc] if prefix else loc)
        keys.append(key)
        if item["type"] == "extra_forbidden":
            known = _known_keys(model, loc[:-1])
            hint = difflib.get_close_matches(loc[-1], known, n=1)
            suggestion = f"; did you mean '{hint[0]}'?" if hint else ""
            lines.append(f"unknown key '{key}'{suggestion} (known: {', '.join(sorted(known))})")
        elif item["type"] == "missing":
            lines.append(f"missing required key '{key}'")
        else:
            shown = (
                ""
                if "secret" in key or "token" in key or "password" in key
                else (
                    f" (got {item.get('input')!r})"
                    if not isinstance(item.get("input"), dict)
                    else ""
                )
            )
            lines.append(f"'{key}': {item['msg']}{shown}")
    return SettingsError(
        f"{file}: invalid configuration:\n" + "\n".join(f"  - {line}" for line in lines),
        file=file,
        keys=keys,
    )


def _known_keys(model: type[BaseModel], path: list[str]) -> list[str]:
    current: Any = model
    for part in path:
        field = getattr(current, "model_fields", {}).get(part)
        annotation = getattr(field, "annotation", None)
        if not (isinstance(annotation, type) and issubclass(annotation, BaseModel)):
            return []
        current = annotation
    fields = getattr(current, "model_fields", {})
    return [name for name, info in fields.items() if not info.exclude]


def load_settings(path: str | Path | None = None, *, required: bool = False) -> Settings:
    """Load settings from `path` (default `$CRMHUB_CONFIG` or ./crmhub.toml).

    A missing default file yields the built-in defaults; a missing named file is an error.
    """
    named = path or os.environ.get("CRMHUB_CONFIG")
    file = Path(named) if named else Path(DEFAULT_CONFIG)
    data: dict[str, Any] = {}
    if file.exists():
        try:
            data = tomllib.loads(file.read_text(encoding="utf-8"))
        except tomllib.TOMLDecodeError as exc:
            raise SettingsError(f"{file}: not valid TOML: {exc}", file=str(file)) from exc
        data = expand_env(data, "", str(file))
    elif named or required:
        raise SettingsError(
            f"{file}: config file not found. Create one with `crmhub init` "
            "or copy config.example.toml.",
            file=str(file),
        )
    try:
        settings = Settings(**data)
    except ValidationError as exc:
        raise describe_validation_error(exc, str(file), Settings) from None
    settings.source_path = file.resolve() if file.exists() else None
    return settings
