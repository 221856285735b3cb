"""The whole crmhub exception tree.

```
CrmHubError
├── ConfigError                   ops must act; never retried
│   ├── SettingsError             bad or missing setting; names the file and key
│   ├── MappingError              bad mappings/*.toml; file + every problem found
│   └── UnknownConnectorError     kind + the known kinds
├── ConnectorError                carries connector (instance name) and stream
│   ├── TransientError            retry with backoff
│   │   └── RateLimitedError      retry_after seconds
│   ├── PermanentError            fail this run, the source needs attention
│   │   └── AuthError             401/403: credentials expired or revoked
│   └── RecordError               one record unusable: dead-letter it, continue
├── DedupeError
│   └── StaleDecisionError        golden record changed since the steward looked
└── SyncError
    ├── CheckpointError           cursor could not be saved or read
    └── StoreError                unified store unavailable or constraint failure
```

Every error keeps its context as attributes (see `attrs()`), takes keyword-only context
arguments, pickles (arq stores exceptions), and never puts secret values into its message.
"""

from __future__ import annotations

from typing import Any

__all__ = [
    "AuthError",
    "CheckpointError",
    "ConfigError",
    "ConnectorError",
    "CrmHubError",
    "DedupeError",
    "MappingError",
    "PermanentError",
    "RateLimitedError",
    "RecordError",
    "SettingsError",
    "StaleDecisionError",
    "StoreError",
    "SyncError",
    "TransientError",
    "UnknownConnectorError",
]


class CrmHubError(Exception):
    """Base of every error crmhub raises on purpose."""

    def __init__(self, message: str, **context: Any) -> None:
        super().__init__(message)
        self.message = message
        self.context = context
        for key, value in context.items():
            setattr(self, key, value)

    def attrs(self) -> dict[str, Any]:
        """The error's context, for structured logs and `--json` output."""
        return dict(self.context)

    def __reduce__(self) -> tuple[Any, ...]:
        # Keyword context does not survive the default Exception pickling.
        return (_rebuild, (type(self), self.message, self.context))

    def __str__(self) -> str:
        return self.message


def _rebuild(cls: type[CrmHubError], message: str, context: dict[str, Any]) -> CrmHubError:
    return cls(message, **context)


class ConfigError(CrmHubError):
    """A setting, mapping or connector kind that an operator must fix; never retried."""


class SettingsError(ConfigError):
    """Invalid or missing setting; the message names the file and the key."""


class MappingError(ConfigError):
    """Invalid mapping file; `problems` lists every problem found, not just the first."""

    def __init__(self, message: str, *, path: str = "", problems: list[str] | None = None) -> None:
        problems = problems or []
        full = message if not problems else message + "\n" + "\n".join(f"  - {p}" for p in problems)
        super().__init__(full, path=path, problems=problems)
        self.problems: list[str] = problems

    def __reduce__(self) -> tuple[Any, ...]:
        return (_rebuild_mapping, (self.message, self.context))


def _rebuild_mapping(message: str, context: dict[str, Any]) -> MappingError:
    err = MappingError("", path=context.get("path", ""), problems=[])
    err.message = message
    err.args = (message,)
    err.context = context
    return err


class UnknownConnectorError(ConfigError):
    """A connector `type` that no installed connector provides."""


class ConnectorError(CrmHubError):
    """Something went wrong talking to a source; `connector` and `stream` say where."""


class TransientError(ConnectorError):
    """Worth retrying: timeouts, connection errors, 5xx."""


class RateLimitedError(TransientError):
    """The source asked us to slow down; `retry_after` is in seconds (may be None)."""


class PermanentError(ConnectorError):
    """Retrying will not help: the run fails and the source needs attention."""


class AuthError(PermanentError):
    """The credentials were refused (401/403): expired, revoked or lacking a scope."""


class RecordError(ConnectorError):
    """One record is unusable; it goes to the dead-letter table and the run continues."""


class DedupeError(CrmHubError):
    """Matching or merging failed."""


class StaleDecisionError(DedupeError):
    """A steward decided on a golden record that has changed since they looked at it."""


class SyncError(CrmHubError):
    """A sync run could not complete."""


class CheckpointError(SyncError):
    """A cursor could not be saved or read."""


class StoreError(SyncError):
    """The unified store is unavailable or refused a write."""
