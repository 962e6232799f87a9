"""The OpenAPI document, finished: FastAPI's, plus what the service enforces that FastAPI cannot see.

The act and session routes parse their bodies themselves (``service.api.body``) and answer in
MessagePack when asked to (``service.api.replies``), and the engine checks lengths and ranges that
depend on the loaded models. Left out of the document, a client generated from it (or a fuzzer)
would send requests the schema allows and the service refuses, and meet content types the document
never names. So the document is finished here, in one place, for every route:

* every JSON reply of a ``/v1`` or ``/act`` route is documented in MessagePack too;
* with API keys configured, those routes carry the bearer scheme they require;
* the numbers that enter a session's memory carry the engine's limit as ``minimum``/``maximum``;
* a batch's items are validated one by one (a bad item gets its own error in the reply, with 200),
  so the request's schema takes any item, ``ActRequest`` being the one that is stepped;
* the array lengths the engine checks against the loaded models carry them as ``minItems``/
  ``maxItems``: exact when every model agrees (the usual one-model service), bounds otherwise;
* the admin routes exist only with admin keys (they answer 404 otherwise), and then carry their own
  bearer scheme; ``record`` is only ``false`` when the service has no recording directory;
* a columnar tick's rows are one per session (``uniqueItems``, at least one); that every column has
  as many rows as ``session_ids`` is a rule JSON Schema cannot state: the description says it.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from typing import Any

from service.api.body import JSON, MSGPACK
from service.core.engine import INPUT_LIMIT, Engine

#: Prefixes of the routes whose replies follow ``Accept`` (``service.api.body.wants_msgpack``).
NEGOTIATED = ("/v1/", "/act")

#: ``(schema, property)``: numbers the engine refuses beyond ``INPUT_LIMIT`` (422 ``out_of_range``).
BOUNDED_FIELDS = (
    ("ActRequest", "observation"),
    ("ActRequest", "reward"),
    ("ActRequest", "applied_action"),
    ("SessionState", "window"),
    ("SessionState", "prev_action"),
    ("SessionState", "last_action"),
    ("ActColumnarRequest", "observations"),
    ("ActColumnarRequest", "rewards"),
    ("ActColumnarRequest", "applied_actions"),
)

#: ``(schema, property, nesting, dimension)``: an array's length must equal a dimension of the
#: session's model (422); nesting 0 is the array itself, 1 the arrays inside it.
LENGTHS: tuple[tuple[str, str, int, Callable[[Engine], int]], ...] = (
    ("ActRequest", "observation", 0, lambda e: e.obs_dim),
    ("ActRequest", "applied_action", 0, lambda e: e.act_dim),
    ("SessionState", "window", 0, lambda e: e.model.config.window),
    ("SessionState", "window", 1, lambda e: e.model.config.token_dim),
    ("SessionState", "prev_action", 0, lambda e: e.act_dim),
    ("SessionState", "last_action", 0, lambda e: e.act_dim),
    ("ActColumnarRequest", "observations", 1, lambda e: e.obs_dim),
    ("ActColumnarRequest", "applied_actions", 1, lambda e: e.act_dim),
)

ADMIN = "/v1/admin/"


def finish(
    document: dict[str, Any],
    engines: Iterable[Engine] | None,
    *,
    keyed: bool,
    admin: bool = False,
    recording: bool = True,
) -> dict[str, Any]:
    """Complete ``document`` in place (and return it).

    ``engines``: the loaded models, if loaded yet; ``keyed``: API keys are configured, so the
    ``/v1`` routes and ``/act`` need one (documented as a bearer scheme only then); ``admin``: admin
    keys are configured (else the admin routes are left out: they answer 404); ``recording``: the
    service has a recording directory (else ``record`` can only be ``false``).
    """
    paths = document.get("paths", {})
    if not admin:
        for path in [p for p in paths if p.startswith(ADMIN)]:
            del paths[path]
    _document_msgpack(document)
    if keyed:
        _document_scheme(
            document, "apiKey", "An API key (TRMRL_API_KEYS): `Authorization: Bearer <key>`.", admin=False
        )
    if admin:
        _document_scheme(
            document,
            "adminKey",
            "An admin key (TRMRL_ADMIN_KEYS): `Authorization: Bearer <admin key>`.",
            admin=True,
        )
    schemas: dict[str, Any] = document.get("components", {}).get("schemas", {})
    for name, prop in BOUNDED_FIELDS:
        for number in _numbers(_property(schemas, name, prop)):
            number["minimum"], number["maximum"] = -INPUT_LIMIT, INPUT_LIMIT
    _items_one_by_one(schemas)
    _columnar(schemas)
    if not recording and "CreateSessionRequest" in schemas:
        record = schemas["CreateSessionRequest"]["properties"].get("record")
        if record is not None:
            record["const"] = False
            record["description"] = "Recording is off on this service (no TRMRL_RECORD_DIR)."
    loaded = list(engines or ())
    if loaded:
        for name, prop, depth, dimension in LENGTHS:
            sizes = [dimension(engine) for engine in loaded]
            for array in _arrays(_property(schemas, name, prop), depth):
                array["minItems"], array["maxItems"] = min(sizes), max(sizes)
        state = _property(schemas, "SessionState", "length")
        state["maximum"] = max(engine.model.config.window for engine in loaded)
    return document


def _document_msgpack(document: dict[str, Any]) -> None:
    for path, operations in document.get("paths", {}).items():
        if not path.startswith(NEGOTIATED):
            continue
        for operation in operations.values():
            for response in operation.get("responses", {}).values():
                content = response.get("content", {})
                if JSON in content:
                    content.setdefault(MSGPACK, {"schema": content[JSON].get("schema", {})})


def _items_one_by_one(schemas: dict[str, Any]) -> None:
    """A batch's item list takes any value: ``parse_act_batch`` answers a bad item in its place."""
    items = schemas.get("ActBatchRequest", {}).get("properties", {}).get("items", {})
    if items.get("type") == "array":
        items["items"] = {
            "anyOf": [
                items["items"],
                {"description": "Any other value: not stepped; its entry in the reply is its error."},
            ]
        }


def _columnar(schemas: dict[str, Any]) -> None:
    """A tick names each session once, and at least one."""
    tick = schemas.get("ActColumnarRequest", {}).get("properties", {})
    if "session_ids" in tick:
        tick["session_ids"]["uniqueItems"] = True
    if "observations" in tick:
        tick["observations"]["minItems"] = 1


def _document_scheme(document: dict[str, Any], name: str, description: str, admin: bool) -> None:
    """A bearer security scheme, required by the admin routes (``admin``) or by every other API route."""
    components = document.setdefault("components", {})
    components.setdefault("securitySchemes", {})[name] = {
        "type": "http",
        "scheme": "bearer",
        "description": description,
    }
    for path, operations in document.get("paths", {}).items():
        if path.startswith(ADMIN) if admin else (path.startswith(NEGOTIATED) and not path.startswith(ADMIN)):
            for operation in operations.values():
                operation["security"] = [{name: []}]


def _property(schemas: dict[str, Any], name: str, prop: str) -> dict[str, Any]:
    found: dict[str, Any] = schemas[name]["properties"][prop]
    return found


def _branches(schema: dict[str, Any]) -> Iterator[dict[str, Any]]:
    """``schema`` itself, or the branches of an ``anyOf`` (an optional field is ``T | None``)."""
    yield from schema.get("anyOf", [schema])


def _numbers(schema: dict[str, Any]) -> Iterator[dict[str, Any]]:
    """Every ``number`` schema in ``schema``, through arrays."""
    for branch in _branches(schema):
        if branch.get("type") == "number":
            yield branch
        elif branch.get("type") == "array":
            yield from _numbers(branch.get("items", {}))


def _arrays(schema: dict[str, Any], depth: int) -> Iterator[dict[str, Any]]:
    """The array schemas ``depth`` levels of nesting into ``schema``."""
    for branch in _branches(schema):
        if branch.get("type") == "array":
            if depth == 0:
                yield branch
            else:
                yield from _arrays(branch.get("items", {}), depth - 1)
