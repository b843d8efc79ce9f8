"""The OpenAPI document's request body of ``POST /generate``.

The route reads its body itself (the model's paradigm picks the schema, after a bounded parse), so
FastAPI cannot infer it; this adds it: any of the paradigms' request models. Clients, docs and
schemathesis then see every field with its bounds.
"""

from __future__ import annotations

from typing import Any

from fastapi import FastAPI

from service.api.schemas import REQUEST_SCHEMAS


def document_generate_body(app: FastAPI) -> None:
    build_default = app.openapi

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is not None:
            return app.openapi_schema
        schema = build_default()
        components = schema.setdefault("components", {}).setdefault("schemas", {})
        references = []
        for model in REQUEST_SCHEMAS.values():
            model_schema = model.model_json_schema(ref_template="#/components/schemas/{model}")
            components.update(model_schema.pop("$defs", {}))
            components[model.__name__] = model_schema
            references.append({"$ref": f"#/components/schemas/{model.__name__}"})
        operation = schema.get("paths", {}).get("/generate", {}).get("post")
        if operation is not None:
            operation["requestBody"] = {"required": True,
                                        "content": {"application/json": {"schema": {"anyOf": references}}}}
        app.openapi_schema = schema
        return schema

    app.openapi = openapi  # type: ignore[method-assign]
