"""Hostile input at every JSON route: non-finite and out-of-range numbers in any field
(nested included) are a 422 naming the field, never a 5xx; 422 and 500 bodies are always
valid JSON and never carry anything internal.

The numeric fields are read from the app's own OpenAPI schema, so a field added later is
covered without touching this module.
"""

from __future__ import annotations

import json
import logging
import math
from pathlib import Path
from typing import Any

import pytest
from fastapi.exceptions import RequestValidationError
from fastapi.testclient import TestClient
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pydantic import ValidationError

from service.main import create_app
from shortened.config import Settings
from shortened.specs import CalibrationSpec, EvalSpec, PruneSpec, RetrainSpec

PRUNE = {
    "model": "models/tiny-llama",
    "num_blocks": 1,
    "calibration": {"source": "data/calibration.jsonl", "n_samples": 4},
}
RETRAIN = {"model": "models/tiny-llama", "data": {"source": "data/alpaca_tiny.jsonl"}}
EVAL = {"model": "models/tiny-llama", "perplexity": {"datasets": ["data/stdlib_docs_heldout.txt"]}}
EXPORT = {
    "model": "models/tiny-llama",
    "targets": [{"format": "gguf", "type": "q8_0"}],
    "perplexity": {"datasets": ["data/stdlib_docs_heldout.txt"]},
}
SEARCH = {
    "model": "models/tiny-llama",
    "target_ratio": 0.2,
    "calibration": {"source": "data/calibration.jsonl", "n_samples": 4},
}
PLACEHOLDER = "__hostile_number__"
# Literals Python's json reads (or refuses oddly) and values no field accepts.
NON_JSON = ["NaN", "Infinity", "-Infinity", "1e400", "-1e400", "1E+999"]
BEYOND_64_BITS = [str(2**63), str(-(2**63) - 1), str(2**64 + 7), "9" * 40, "9" * 5000]
ABSURD = ["1e300", "-1e300", str(10**15), str(-(10**15)), str(2**62), "1e15"]
HOSTILE = NON_JSON + BEYOND_64_BITS + ABSURD


@pytest.fixture(scope="module")
def client(tmp_path_factory):
    root: Path = tmp_path_factory.mktemp("hostile")
    with TestClient(
        create_app(Settings(data_dir=root / "var", scheduler_interval_s=0, reaper_interval_s=0)),
        raise_server_exceptions=False,
    ) as client:
        yield client


@pytest.fixture(scope="module")
def schedule_id(client: TestClient) -> str:
    response = client.post("/schedules", json={"cron": "0 3 * * *", "template": PRUNE})
    assert response.status_code == 201, response.text
    return response.json()["id"]


# ---------------------------------------------------------------------------- schema walk


def numeric_paths(openapi: dict[str, Any], schema: dict[str, Any]) -> list[tuple[Any, ...]]:
    """Every path to an integer or number in ``schema`` (lists as index 0)."""
    components = openapi["components"]["schemas"]
    out: list[tuple[Any, ...]] = []

    def walk(node: dict[str, Any], path: tuple[Any, ...], seen: frozenset[str]) -> None:
        if "$ref" in node:
            name = node["$ref"].rsplit("/", 1)[-1]
            if name not in seen:  # PruneSpec -> PipelineEval -> ... has no cycle, but be safe
                walk(components[name], path, seen | {name})
            return
        for key in ("anyOf", "oneOf", "allOf"):
            for option in node.get(key, []):
                walk(option, path, seen)
        kind = node.get("type")
        if kind in ("integer", "number"):
            out.append(path)
        for name, child in (node.get("properties") or {}).items():
            walk(child, (*path, name), seen)
        if isinstance(node.get("items"), dict):
            walk(node["items"], (*path, 0), seen)

    walk(schema, (), frozenset())
    return sorted(set(out), key=str)


def routes(client: TestClient, schedule_id: str) -> list[tuple[str, str, dict, list[tuple]]]:
    """(method, path, a valid body, numeric field paths) of every JSON route."""
    openapi = client.app.openapi()
    spec_schema = {
        name: {"$ref": f"#/components/schemas/{name}"}
        for name in ("PruneSpec", "RetrainSpec", "EvalSpec", "SearchSpec", "ExportSpec")
    }
    prune_paths = numeric_paths(openapi, spec_schema["PruneSpec"])
    table = [
        ("post", "/jobs/prune", PRUNE, prune_paths),
        ("post", "/jobs/retrain", RETRAIN, numeric_paths(openapi, spec_schema["RetrainSpec"])),
        ("post", "/jobs/eval", EVAL, numeric_paths(openapi, spec_schema["EvalSpec"])),
        ("post", "/jobs/search", SEARCH, numeric_paths(openapi, spec_schema["SearchSpec"])),
        ("post", "/jobs/export", EXPORT, numeric_paths(openapi, spec_schema["ExportSpec"])),
        # Specs inside free-form fields: the batch's base and grid, a schedule's template.
        (
            "post",
            "/jobs/batch",
            {"base": PRUNE, "grid": {"criterion": ["ppl", "magnitude"]}},
            [("base", *p) for p in prune_paths] + [("grid", "criterion", 0)],
        ),
        (
            "post",
            "/jobs/batch",
            {"base": PRUNE, "grid": {"num_blocks": [1, 2]}},
            [("grid", "num_blocks", 1)],
        ),
        (
            "post",
            "/schedules",
            {"cron": "0 3 * * *", "template": PRUNE},
            [("template", *p) for p in prune_paths],
        ),
        (
            "patch",
            f"/schedules/{schedule_id}",
            {"template": PRUNE},
            [("template", *p) for p in prune_paths],
        ),
        ("post", "/webhooks", {"url": "http://127.0.0.1:9/hook"}, []),
    ]
    # Every route's own schema: nothing numeric may be missed by the table above.
    json_routes = {
        (method, path)
        for path, operations in openapi["paths"].items()
        for method, operation in operations.items()
        if "application/json" in (operation.get("requestBody") or {}).get("content", {})
    }
    covered = {(m, p.replace(schedule_id, "{schedule_id}")) for m, p, _, _ in table}
    assert json_routes == covered
    return [(m, p, body, [*paths, ("unknown_field",)]) for m, p, body, paths in table]


def put(body: Any, path: tuple[Any, ...], value: Any) -> Any:
    """A copy of ``body`` with ``value`` at ``path`` (missing dicts and lists created)."""
    body = json.loads(json.dumps(body))
    node = body
    for part, following in zip(path, path[1:], strict=False):
        empty: Any = [] if isinstance(following, int) else {}
        if isinstance(node, list):
            while len(node) <= part:
                node.append(empty)
            node = node[part]
        else:
            if not isinstance(node.get(part), (dict, list)):
                node[part] = empty
            node = node[part]
    last = path[-1]
    if isinstance(node, list):
        while len(node) <= last:
            node.append(None)
    node[last] = value
    return body


def names(error_loc: list[Any], path: tuple[Any, ...]) -> bool:
    """Whether an error's loc names the field at ``path`` (a list field's error may name
    the list rather than the item)."""
    loc = tuple(error_loc)
    trimmed = path
    while trimmed and isinstance(trimmed[-1], int):
        trimmed = trimmed[:-1]
    return loc in {("body", *path), ("body", *trimmed)}


def send(client: TestClient, method: str, url: str, text: str):
    return client.request(method, url, content=text, headers={"content-type": "application/json"})


def assert_clean_422(response, path: tuple[Any, ...]) -> None:
    assert response.status_code == 422, (path, response.status_code, response.text[:500])
    detail = json.loads(response.text)["detail"]  # strict: no NaN/Infinity in the answer
    assert any(names(error["loc"], path) for error in detail), (path, detail)


# ---------------------------------------------------------------------------- properties


def test_every_spec_number_has_an_upper_bound():
    """The class fix for absurd values: every integer and float of every spec has a maximum
    (and so cannot be 1e300 or a 5000-digit integer)."""
    for model in (PruneSpec, RetrainSpec, EvalSpec):
        schema = model.model_json_schema()
        defs = schema.get("$defs", {})
        for name, sub in [(model.__name__, schema), *defs.items()]:
            for field, prop in (sub.get("properties") or {}).items():
                for option in [prop, *prop.get("anyOf", [])]:
                    items = option.get("items") or {}
                    for node in (option, items):
                        if node.get("type") in ("integer", "number"):
                            bounded = "maximum" in node or "exclusiveMaximum" in node
                            assert bounded, f"{name}.{field} has no upper bound"


@settings(
    max_examples=250,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(data=st.data())
def test_hostile_number_in_any_numeric_field_of_any_route_is_422_naming_it(
    client: TestClient, schedule_id: str, data: st.DataObject
):
    method, url, body, paths = data.draw(st.sampled_from(routes(client, schedule_id)))
    path = data.draw(st.sampled_from(paths))
    literal = data.draw(st.sampled_from(HOSTILE))
    text = json.dumps(put(body, path, PLACEHOLDER)).replace(f'"{PLACEHOLDER}"', literal)
    assert_clean_422(send(client, method, url, text), path)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    document=st.recursive(
        st.one_of(
            st.none(),
            st.booleans(),
            st.text(max_size=5),
            st.integers(min_value=-(2**70), max_value=2**70),
            st.floats(allow_nan=True, allow_infinity=True),
        ),
        lambda children: (
            st.lists(children, max_size=3)
            | st.dictionaries(st.text(max_size=5), children, max_size=3)
        ),
        max_leaves=10,
    ),
    target=st.sampled_from(["/jobs/prune", "/jobs/batch", "/schedules", "/webhooks"]),
)
def test_any_json_document_gets_no_5xx_and_a_valid_json_answer(
    client: TestClient, document: Any, target: str
):
    response = send(client, "post", target, json.dumps(document))  # NaN/Infinity literals
    assert response.status_code < 500, response.text
    json.loads(response.text)  # strict JSON
    bad = [v for v in _leaves(document) if isinstance(v, float) and not math.isfinite(v)] + [
        v for v in _leaves(document) if type(v) is int and not -(2**63) <= v < 2**63
    ]
    if bad:
        assert response.status_code == 422


def _leaves(value: Any) -> list[Any]:
    if isinstance(value, dict):
        return [leaf for child in value.values() for leaf in _leaves(child)]
    if isinstance(value, list):
        return [leaf for child in value for leaf in _leaves(child)]
    return [value]


def test_non_json_literals_are_refused_even_where_a_number_is_accepted(client: TestClient):
    """Decided: NaN/Infinity are not JSON and are refused with 422, not read as floats."""
    for literal in ("NaN", "Infinity", "-Infinity", "1e400"):
        text = json.dumps(put(PRUNE, ("target_ratio",), PLACEHOLDER)).replace(
            f'"{PLACEHOLDER}"', literal
        )
        body = json.loads(text)
        del body["num_blocks"]
        response = send(client, "post", "/jobs/prune", json.dumps(body))
        (error,) = response.json()["detail"]
        assert error["loc"] == ["body", "target_ratio"] and "finite" in error["msg"]
    assert client.get("/jobs").json()["items"] == []


def test_specs_refuse_non_finite_floats_outside_http_too():
    """The CLI and the worker validate with the same models."""
    with pytest.raises(ValidationError) as excinfo:
        PruneSpec.model_validate({**PRUNE, "num_blocks": None, "target_ratio": math.nan})
    assert excinfo.value.errors()[0]["loc"] == ("target_ratio",)
    with pytest.raises(ValidationError):
        RetrainSpec.model_validate({**RETRAIN, "learning_rate": math.inf})
    with pytest.raises(ValidationError):
        CalibrationSpec.model_validate({"source": "x", "seed": 2**32})


# ---------------------------------------------------------------------------- handlers


@pytest.fixture(scope="module")
def probes(client: TestClient) -> TestClient:
    """Routes of the real app that raise what a route deep down might raise."""

    def validation_error() -> None:
        raise RequestValidationError(
            [
                {
                    "loc": ("body", "x"),
                    "msg": "bad",
                    "type": "value_error",
                    "input": math.nan,
                    "ctx": {"error": ValueError("bad"), "limit": math.inf, "big": 10**5000},
                },
                {"loc": ("body",), "msg": "whole", "type": "model", "input": {"a": math.inf}},
            ]
        )

    def crash() -> None:
        raise RuntimeError("boom in /work/secret/module.py with torch 2.3.1")

    client.app.add_api_route("/_probe/validation", validation_error, methods=["POST"])
    client.app.add_api_route("/_probe/crash", crash, methods=["POST"])
    return client


def test_validation_errors_with_unencodable_values_still_answer_valid_json(probes: TestClient):
    response = probes.post("/_probe/validation")
    assert response.status_code == 422
    first, whole = json.loads(response.text)["detail"]
    assert first["loc"] == ["body", "x"] and first["input"] == "nan"
    assert first["ctx"] == {"error": "bad", "limit": "inf", "big": "integer beyond 64 bits"}
    assert whole == {"loc": ["body"], "msg": "whole", "type": "model"}  # containers not echoed


def test_unexpected_exception_is_a_generic_500_logged_with_an_id(
    probes: TestClient, caplog: pytest.LogCaptureFixture
):
    with caplog.at_level(logging.ERROR, logger="service.errors"):
        response = probes.post("/_probe/crash")
    assert response.status_code == 500
    assert response.json() == {"detail": "internal error", "code": "internal_error"}
    error_id = response.headers["x-error-id"]
    (record,) = [r for r in caplog.records if error_id in r.getMessage()]
    assert record.exc_info is not None and "boom" in str(record.exc_info[1])
