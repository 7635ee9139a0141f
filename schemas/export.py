"""JSON Schema exports of the Arrow schemas and of the recipe, for people and other tools."""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow as pa

from schemas import OUTPUT_SCHEMAS

HERE = Path(__file__).resolve().parent


def arrow_type_to_json(arrow_type: pa.DataType) -> dict:
    if pa.types.is_string(arrow_type) or pa.types.is_large_string(arrow_type):
        return {"type": "string"}
    if pa.types.is_integer(arrow_type):
        return {"type": "integer"}
    if pa.types.is_floating(arrow_type):
        return {"type": "number"}
    if pa.types.is_boolean(arrow_type):
        return {"type": "boolean"}
    if pa.types.is_binary(arrow_type) or pa.types.is_large_binary(arrow_type):
        return {"type": "string", "contentEncoding": "base64"}
    if pa.types.is_list(arrow_type) or pa.types.is_large_list(arrow_type):
        return {"type": "array", "items": arrow_type_to_json(arrow_type.value_type)}
    if pa.types.is_struct(arrow_type):
        return {"type": "object", "additionalProperties": False,
                "properties": {f.name: field_to_json(f) for f in arrow_type},
                "required": [f.name for f in arrow_type if not f.nullable]}
    raise TypeError(f"no JSON Schema mapping for Arrow type {arrow_type}")


def field_to_json(field: pa.Field) -> dict:
    schema = arrow_type_to_json(field.type)
    if field.nullable:
        schema = {"anyOf": [schema, {"type": "null"}]}
    doc = (field.metadata or {}).get(b"doc")
    if doc:
        schema["description"] = doc.decode()
    return schema


def arrow_to_json_schema(name: str, schema: pa.Schema) -> dict:
    return {
        "$schema": "https://json-schema.org/draft/2020-12/schema",
        "title": f"{name} row",
        "description": f"One row of the '{name}' table (Arrow schema schemas.{name.upper()}_SCHEMA).",
        "type": "object",
        "properties": {f.name: field_to_json(f) for f in schema},
        "required": [f.name for f in schema if not f.nullable],
    }


def write_json_schemas(out_dir: Path | None = None) -> list[Path]:
    from curation.recipe import recipe_json_schema

    out_dir = out_dir or HERE
    out_dir.mkdir(parents=True, exist_ok=True)
    written = []
    documents = {f"{name}.schema.json": arrow_to_json_schema(name, schema) for name, schema in OUTPUT_SCHEMAS.items()}
    documents["recipe.schema.json"] = recipe_json_schema()
    for file_name, document in documents.items():
        path = out_dir / file_name
        path.write_text(json.dumps(document, indent=2) + "\n", encoding="utf-8")
        written.append(path)
    return written


if __name__ == "__main__":
    for written_path in write_json_schemas():
        print(written_path)
