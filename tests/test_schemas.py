"""The Arrow schemas and their JSON Schema exports agree, and outputs follow them."""

import json
from pathlib import Path

import pyarrow as pa
import pytest

from schemas import OUTPUT_SCHEMAS, RECORD_SCHEMA, conform
from schemas.export import arrow_to_json_schema

HERE = Path(__file__).resolve().parent.parent / "schemas"


@pytest.mark.parametrize("name", sorted(OUTPUT_SCHEMAS))
def test_shipped_json_schema_is_current(name):
    shipped = json.loads((HERE / f"{name}.schema.json").read_text())
    assert shipped == arrow_to_json_schema(name, OUTPUT_SCHEMAS[name]), "stale export: run `make schemas`"


def test_messages_are_role_content_structs_in_every_conversational_output():
    message = pa.struct([("role", pa.string()), ("content", pa.string())])
    assert OUTPUT_SCHEMAS["sft"].field("messages").type == pa.list_(message)
    for column in ("prompt", "chosen", "rejected"):
        assert OUTPUT_SCHEMAS["preference"].field(column).type == pa.list_(message)


def test_conform_fills_nullable_columns_and_names_missing_required_ones():
    table = pa.table({"id": ["a"], "messages": [[{"role": "user", "content": "hi"}]], "source": ["s"],
                      "source_file": ["f"], "source_record": ["line:1"], "source_sha256": ["0"],
                      "format": ["alpaca"], "kind": ["prompt"]})
    conformed = conform(table, RECORD_SCHEMA)
    assert conformed.schema.names == RECORD_SCHEMA.names
    assert conformed.column("score").null_count == 1
    with pytest.raises(ValueError, match="column 'kind' is missing"):
        conform(table.drop(["kind"]), RECORD_SCHEMA)
