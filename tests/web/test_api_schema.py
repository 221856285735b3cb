"""schemathesis against `/openapi.json`: every operation, fed generated requests by a viewer, a
steward and an admin, answers without a server error and as its schema says.

A real uvicorn on loopback serves a store seeded through the real pipeline. The REST API
(`/api/v1`) gets all of schemathesis' checks (status codes, content types and bodies as
documented, valid data accepted); the intake and ops endpoints get the server-error check only
(their error statuses are not documented in the schema yet). Generation is derandomized, so CI
sees the same requests every run; `API_FUZZ_EXAMPLES=200` runs a deeper local search.
"""

from __future__ import annotations

import asyncio
import os
import re
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from itertools import product
from typing import Any

import pytest
import schemathesis
from fastapi import FastAPI
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.errors import Unsatisfiable
from schemathesis import GenerationMode
from schemathesis.checks import not_a_server_error
from schemathesis.core.failures import FailureGroup
from sqlalchemy import Engine, select

from crmhub.web import api, create_app
from sync import users
from sync.review import BUCKETS
from sync.store import golden_record, review_item
from sync.users import add_user, create_token
from tests.steward_data import seed_reviews
from tests.web.conftest import PASSWORD, live

EXAMPLES = int(os.environ.get("API_FUZZ_EXAMPLES", "12"))
ADMIN_ONLY = ("/api/v1/users", "/api/v1/forget")


@dataclass(frozen=True)
class Pass:
    """One sweep: a role, a generation mode, examples per operation, which operations, and
    whether path ids are drawn from the store (else generated, and nearly always unknown)."""

    role: str
    mode: GenerationMode
    examples: int
    covers: Callable[[str], bool]
    known_ids: bool = False


def _with_ids(path: str) -> bool:
    return "{" in path and path.startswith("/api/v1/")


PASSES = (
    Pass("steward", GenerationMode.POSITIVE, 2 * EXAMPLES, lambda path: True),
    Pass("steward", GenerationMode.POSITIVE, 2 * EXAMPLES, _with_ids, known_ids=True),
    Pass("steward", GenerationMode.NEGATIVE, EXAMPLES, lambda path: path.startswith("/api/")),
    Pass("viewer", GenerationMode.POSITIVE, EXAMPLES // 2, lambda path: True),
    Pass("admin", GenerationMode.POSITIVE, 2 * EXAMPLES, lambda path: path in ADMIN_ONLY),
    Pass("admin", GenerationMode.NEGATIVE, EXAMPLES, lambda path: path in ADMIN_ONLY),
)


def _store_ids(db: Engine) -> dict[str, list[Any]]:
    """Path parameter values that name something real, for the `known_ids` sweep."""
    with db.connect() as conn:
        reviews = conn.execute(select(review_item.c.id)).scalars().all()
        goldens = conn.execute(select(golden_record.c.id)).scalars().all()
    return {"review_id": list(reviews), "golden_id": list(goldens), "bucket": list(BUCKETS)}


@pytest.fixture
def api_server(tmp_path, store_url, db) -> Iterator[tuple[str, dict[str, str], FastAPI]]:
    settings_ = asyncio.run(seed_reviews(tmp_path, store_url, db, count=5))
    tokens = {}
    for role in ("viewer", "steward", "admin"):
        add_user(db, role, PASSWORD, role)
        tokens[role] = create_token(db, role, "schemathesis")
    app = create_app(settings_, db)
    with live(app) as server:
        yield server.url, tokens, app


def _checks_for(path: str, mode: GenerationMode) -> dict[str, Any]:
    if not path.startswith("/api/v1/"):
        return {"checks": [not_a_server_error]}
    if mode is GenerationMode.NEGATIVE:
        # Negative mode also sends a string parameter twice (`?q=a&q=b`, "an array where a
        # string belongs"); FastAPI takes the last value, as most servers do. Rejecting that
        # is not worth a rule: every other check still runs on negative cases.
        return {"excluded_checks": [schemathesis.checks.negative_data_rejection]}
    return {}


def _fuzz(
    op: Any,
    sweep: Pass,
    base: str,
    headers: dict[str, str],
    statuses: Counter[tuple[str, str, int]],
    ids: dict[str, list[Any]],
) -> Callable[[], None]:
    """A Hypothesis test that sends `sweep.examples` generated requests for `op`."""
    kwargs = _checks_for(op.path, sweep.mode)
    strategy = op.as_strategy(generation_mode=sweep.mode)
    if sweep.known_ids:
        names = [p.name for p in op.path_parameters]
        fixed = [dict(zip(names, values, strict=True)) for values in product(*map(ids.get, names))]
        strategy = st.one_of(
            [op.as_strategy(generation_mode=sweep.mode, path_parameters=f) for f in fixed]
        )

    @settings(
        max_examples=max(1, sweep.examples),
        deadline=None,
        derandomize=True,
        database=None,
        suppress_health_check=list(HealthCheck),
    )
    @given(case=strategy)
    def run(case: schemathesis.Case) -> None:
        response = case.call_and_validate(base_url=base, headers=headers, **kwargs)
        statuses[(sweep.role, op.label, response.status_code)] += 1

    return run  # type: ignore[no-any-return]


def test_every_operation_matches_the_schema_without_server_errors(api_server, db):
    base, tokens, app = api_server
    ids = _store_ids(db)
    schema = schemathesis.openapi.from_url(f"{base}/openapi.json")
    # Unknown query parameters are ignored by design (as by most servers), not refused.
    schema.config.generation.update(allow_extra_parameters=False)
    operations = [result.ok() for result in schema.get_all_operations()]
    documented = {
        f"{method.upper()} {path}" for path, ops in app.openapi()["paths"].items() for method in ops
    }
    assert {op.label for op in operations} == documented
    assert sum(label.split(" ")[1].startswith("/api/v1/") for label in documented) >= 16

    statuses: Counter[tuple[str, str, int]] = Counter()
    failures: list[str] = []
    for sweep in PASSES:
        headers = {"Authorization": f"Bearer {tokens[sweep.role]}"}
        # Approvals last: the pairs they merge are settled, so skip and reject get their turn.
        for op in sorted(operations, key=lambda op: op.path.endswith("/approve")):
            if not sweep.covers(op.path):
                continue
            run = _fuzz(op, sweep, base, headers, statuses, ids)
            try:
                run()
            except Unsatisfiable:
                # Nothing to break: no parameter or body whose schema a request could violate.
                assert sweep.mode is GenerationMode.NEGATIVE, op.label
            except Exception as exc:
                failures.append(f"{sweep.role} {sweep.mode.value} {op.label}:\n{exc}")

    assert not failures, "\n\n".join(failures)
    answered = {label for (_role, label, _status) in statuses}
    assert answered == documented, f"never answered: {sorted(documented - answered)}"
    # The run got past authentication into the operations themselves.
    decided = {
        label
        for (role, label, status) in statuses
        if role != "viewer" and status == 200 and label.startswith("POST /api/v1/")
    }
    assert decided, f"no state change succeeded: {sorted(statuses.items())}"


def test_the_schema_user_name_rule_is_the_store_rule():
    assert users._NAME.pattern == api.USER_NAME_PATTERN


STATEFUL_SCENARIOS = int(os.environ.get("API_FUZZ_SCENARIOS", "15"))


def test_stateful_walks_along_the_links_without_failures(api_server):
    """schemathesis' state machine, as admin (every operation allowed), follows the schema's
    links from one answer to the next (a pair from the queue to its merge, the golden record,
    the split, the erasure) and runs every check on every step. Which links a scenario takes
    is random (schemathesis draws them with true randomness); the chain itself is walked
    deterministically in the next test."""
    base, tokens, _app = api_server
    # Bulk approval would settle the whole seeded queue in one step (the stateless sweep
    # covers it); without it the walk merges pair by pair.
    schema = (
        schemathesis.openapi.from_url(f"{base}/openapi.json")
        .include(path_regex="^/api/v1/")
        .exclude(operation_id="approveBucket")
    )
    schema.config.generation.update(allow_extra_parameters=False)
    headers = {"Authorization": f"Bearer {tokens['admin']}"}
    answered: Counter[tuple[str, int]] = Counter()

    class Walk(schema.as_state_machine()):  # type: ignore[misc]
        def get_call_kwargs(self, case: schemathesis.Case) -> dict[str, Any]:
            return {"base_url": base, "headers": headers}

        def after_call(self, response: Any, case: schemathesis.Case) -> None:
            super().after_call(response, case)  # records the step for the stateful checks
            answered[(case.operation.label, response.status_code)] += 1

        def validate_response(
            self, response: Any, case: schemathesis.Case, *args: Any, **kw: Any
        ) -> None:
            # Collected rather than raised: Hypothesis would replay a failing scenario, and
            # the server's state has moved on by then (a "flaky" report hiding the failure).
            try:
                super().validate_response(response, case, *args, **kw)
            except FailureGroup as exc:
                failures.append(f"{case.operation.label} -> {response.status_code}:\n{exc}")

    failures: list[str] = []
    Walk.run(
        settings=settings(
            max_examples=STATEFUL_SCENARIOS,
            stateful_step_count=6,
            deadline=None,
            derandomize=True,
            database=None,
            suppress_health_check=list(HealthCheck),
        )
    )
    assert not failures, "\n\n".join(failures[:5])
    assert not [key for key in answered if key[1] >= 500], answered
    assert sum(answered.values()) >= 2 * STATEFUL_SCENARIOS, answered


def _evaluate(expression: Any, response: Any, path_params: dict[str, Any]) -> Any:
    """An OpenAPI runtime expression (`$response.body#/a/0/b`, `$request.path.x`, or either
    embedded in a string as `{...}`), as a client following the link evaluates it."""
    if isinstance(expression, dict):
        return {k: _evaluate(v, response, path_params) for k, v in expression.items()}
    if not isinstance(expression, str):
        return expression

    def one(expr: str) -> Any:
        if expr.startswith("$request.path."):
            return path_params[expr.removeprefix("$request.path.")]
        assert expr.startswith("$response.body#/"), expr
        value = response
        for part in expr.removeprefix("$response.body#/").split("/"):
            value = value[int(part)] if isinstance(value, list) else value[part]
        return value

    if expression.startswith("$"):
        return one(expression)
    return re.sub(r"\{(\$[^}]+)\}", lambda m: str(one(m.group(1))), expression)


async def test_the_links_lead_from_the_queue_to_merge_split_and_erasure(workspace, db):
    """Follow the schema's links by hand, as admin: queue -> pair -> approve (with `seen`) ->
    golden record -> unmerge -> erase the split-off person; buckets -> preview -> approve."""
    async with workspace.client("admin") as admin:
        schema = (await admin.get("/openapi.json")).json()
        by_id = {
            op["operationId"]: (method.upper(), path)
            for path, ops in schema["paths"].items()
            for method, op in ops.items()
        }

        async def follow(source: str, link: str, response: Any, path_params: dict) -> Any:
            method, path = by_id[source]
            spec = schema["paths"][path][method.lower()]["responses"]["200"]["links"][link]
            target_method, target_path = by_id[spec["operationId"]]
            params = _evaluate(spec.get("parameters", {}), response, path_params)
            body = _evaluate(spec.get("requestBody"), response, path_params)
            url = target_path.format(**params)
            answer = await admin.request(target_method, url, json=body)
            return answer, params

        listing = (await admin.get("/api/v1/review")).json()
        shown, params = await follow("listReviews", "showReview", listing, {})
        assert shown.status_code == 200
        approved, _ = await follow("showReview", "approveReview", shown.json(), params)
        assert approved.status_code == 200, approved.text
        golden, _ = await follow("approveReview", "getGolden", approved.json(), {})
        assert len(golden.json()["members"]) == 2
        split, _ = await follow("approveReview", "unmergeGolden", approved.json(), {})
        assert split.status_code == 200, split.text
        alone, _ = await follow("unmergeGolden", "getGolden", split.json(), {})
        assert [m["record_id"] for m in alone.json()["members"]] == [split.json()["record_id"]]
        erased, _ = await follow("unmergeGolden", "forget", split.json(), {})
        assert erased.status_code == 200, erased.text
        assert erased.json()["source_records"] == 1
        gone, _ = await follow("unmergeGolden", "getGolden", split.json(), {})
        assert gone.status_code == 404

        buckets = (await admin.get("/api/v1/buckets")).json()
        preview, params = await follow("listBuckets", "previewBucket", buckets, {})
        assert preview.status_code == 200
        bulk, _ = await follow("previewBucket", "approveBucket", preview.json(), params)
        assert bulk.status_code == 200, bulk.text
        assert bulk.json()["approved"] == preview.json()["count"]
