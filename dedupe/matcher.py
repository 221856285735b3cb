"""The matcher seam and the exact matcher (normalised email key / E.164 phone)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal, NamedTuple, Protocol

from crmhub.records import Contact

__all__ = ["Decision", "ExactMatcher", "MatchKey", "Matcher", "build_matcher", "email_key"]

_GMAIL = {"gmail.com", "googlemail.com"}
# Shared mailboxes say nothing about who a person is.
ROLE_LOCAL_PARTS = frozenset(
    {
        "info",
        "sales",
        "support",
        "hello",
        "contact",
        "admin",
        "office",
        "team",
        "noreply",
        "no-reply",
        "marketing",
        "billing",
        "help",
        "enquiries",
        "inquiries",
        "jobs",
        "hr",
    }
)


class MatchKey(NamedTuple):
    """A blocking key: records sharing one are compared."""

    kind: str
    value: str


@dataclass(frozen=True, slots=True)
class Decision:
    """What the matcher thinks of one pair, and why."""

    action: Literal["merge", "review", "separate"]
    probability: float
    explanation: dict[str, Any] = field(default_factory=dict)


class Matcher(Protocol):
    """What the pipeline needs from a matcher."""

    version: str

    def keys(self, contact: Contact) -> list[MatchKey]:
        """Blocking keys for `contact` (stored; candidates share at least one)."""
        ...

    def compare(self, a: Contact, b: Contact) -> Decision:
        """Decide whether two contacts are the same person. Must be symmetric."""
        ...


def email_key(email: str) -> str:
    """The identity key of an address: lowercase; gmail ignores dots and +tags."""
    local, _, domain = email.lower().partition("@")
    local = local.split("+", 1)[0]
    if domain in _GMAIL:
        local = local.replace(".", "")
        domain = "gmail.com"
    return f"{local}@{domain}"


def is_role_address(email: str) -> bool:
    return email.partition("@")[0].lower() in ROLE_LOCAL_PARTS


class ExactMatcher:
    """Same person when a normalised email key or an E.164 phone is shared."""

    version = "exact-1"

    def keys(self, contact: Contact) -> list[MatchKey]:
        keys = [MatchKey("email", email_key(e)) for e in contact.emails if not is_role_address(e)]
        keys += [MatchKey("phone", p) for p in contact.phones]
        return list(dict.fromkeys(keys))

    def compare(self, a: Contact, b: Contact) -> Decision:
        shared = {k.kind for k in set(self.keys(a)) & set(self.keys(b))}
        if shared:
            return Decision("merge", 1.0, {"shared": sorted(shared)})
        return Decision("separate", 0.0, {"shared": []})


def build_matcher(auto_merge: float = 0.95, review: float = 0.80, region: str = "US") -> Matcher:
    """The matcher the pipeline uses for these thresholds."""
    return ExactMatcher()
