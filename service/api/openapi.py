"""Request-body schemas in ``/docs`` for routes that read their body themselves (size limits, safe
parsing, paradigm dispatch) instead of letting FastAPI parse it."""

from __future__ import annotations

from typing import Any

from fastapi import FastAPI
from fastapi.openapi.utils import get_openapi
from pydantic import BaseModel

REF_TEMPLATE = "#/components/schemas/{model}"
_DOCUMENTED: dict[str, type[BaseModel]] = {}


def request_body(*models: type[BaseModel]) -> dict[str, Any]:
    """``openapi_extra`` for a route whose JSON body is one of ``models``."""
    for model in models:
        _DOCUMENTED[model.__name__] = model
    refs = [{"$ref": REF_TEMPLATE.format(model=model.__name__)} for model in models]
    schema = refs[0] if len(refs) == 1 else {"oneOf": refs}
    return {"requestBody": {"required": True, "content": {"application/json": {"schema": schema}}}}


def install_openapi(app: FastAPI) -> None:
    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            schema = get_openapi(title=app.title, version=app.version, routes=app.routes,
                                 description=app.description)
            components = schema.setdefault("components", {}).setdefault("schemas", {})
            for name, model in _DOCUMENTED.items():
                model_schema = model.model_json_schema(ref_template=REF_TEMPLATE)
                components.update(model_schema.pop("$defs", {}))
                components[name] = model_schema
            app.openapi_schema = schema
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]
