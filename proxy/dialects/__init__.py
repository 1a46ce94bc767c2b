"""The outbound APIs a route speaks, one module each (`dialect:` in routes.yaml).

A dialect module turns the internal chat request (OpenAI's chat request, rebuilt by
proxy/dialect.py) into its wire body, and its answers back into the internal answer: OpenAI's
chat completion, with the answer text as a string in `content` and the thinking beside it in
`reasoning_content`. Each module has:

    PARAMETERS                  the optional parameters it can express (schema.Parameter)
    body(request, model)        the wire body of a chat request
    answer(completion)          the internal answer out of its JSON answer (in place)
    chunk(chunk)                the internal stream chunk out of one of its chunks (in place)

Adding a dialect is one module here and its name in schema.Route.dialect.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from types import ModuleType
from typing import TYPE_CHECKING, Any, get_args

from proxy.errors import BadRequest
from proxy.policy.schema import Parameter

if TYPE_CHECKING:
    from proxy.policy.schema import Route

OPTIONAL = frozenset(get_args(Parameter))
_LOADED: dict[str, ModuleType] = {}


def of(route: Route) -> ModuleType:
    module = _LOADED.get(route.dialect)
    if module is None:
        module = _LOADED[route.dialect] = importlib.import_module(f"proxy.dialects.{route.dialect}")
    return module


def unsupported(request: dict[str, Any], route: Route) -> list[str]:
    """The request's optional parameters this route does not take, sorted."""
    takes = route.parameters & of(route).PARAMETERS
    return sorted(name for name in request if name in OPTIONAL and name not in takes)


def chat_body(request: dict[str, Any], route: Route) -> dict[str, Any]:
    """The wire body for this route; 400 `unsupported_parameter` naming what it cannot take."""
    if missing := unsupported(request, route):
        raise BadRequest(f"route {route.id} does not support the parameter(s) "
                         f"{', '.join(missing)}; leave them out or ask for another model",
                         param=missing[0], code="unsupported_parameter")
    return of(route).body(request, route.upstream_model)


def fold_choices(data: dict[str, Any], key: str, fold: Callable[[Any], None]
                 ) -> dict[str, Any]:
    """Applies `fold` to each choice's `message` or `delta` (the `key`), in place."""
    for choice in data.get("choices") or ():
        if isinstance(choice, dict):
            fold(choice.get(key))
    return data


def copy_fields(request: dict[str, Any], model: str, names: dict[str, str]) -> dict[str, Any]:
    """The fields a dialect sends, renamed (internal name -> wire name), with one output cap."""
    out: dict[str, Any] = {"model": model}
    for name, value in request.items():
        if (wire := names.get(name)) is not None:
            out[wire] = value
    limit = request.get("max_completion_tokens") or request.get("max_tokens")
    if limit is not None:
        out["max_tokens"] = limit
    return out
