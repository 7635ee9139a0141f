"""Arrow schemas: the contract between stages and of every output.

Every stage takes and returns a table with ``RECORD_SCHEMA`` columns (stage outputs
start null and are filled in by the stage that owns them). Output files use the
``SFT_SCHEMA``, ``PREFERENCE_SCHEMA``, ``PROMPT_SCHEMA``, ``REJECTED_SCHEMA``,
``QUARANTINE_SCHEMA`` and ``LINEAGE_SCHEMA`` layouts. ``python -m schemas`` writes the JSON Schema exports
beside this file so people can read the contract without Python.
"""

from __future__ import annotations

import pyarrow as pa

ROLES = ("system", "user", "assistant")

MESSAGE = pa.struct([("role", pa.string()), ("content", pa.string())])
MESSAGES = pa.list_(MESSAGE)

# Columns written by the readers: where the row came from and what it says.
ORIGIN_FIELDS = [
    pa.field("id", pa.string(), nullable=False,
             metadata={"doc": "stable row id: hash of source name, file name and source_record"}),
    pa.field("messages", MESSAGES, nullable=False,
             metadata={"doc": "the conversation, roles system|user|assistant"}),
    pa.field("prompt_id", pa.string(),
             metadata={"doc": "hash of the normalised conversation before the final assistant turn"}),
    pa.field("generator", pa.string(),
             metadata={"doc": "model that wrote the final answer; null when human or unknown"}),
    pa.field("source", pa.string(), nullable=False, metadata={"doc": "recipe source name"}),
    pa.field("source_file", pa.string(), nullable=False, metadata={"doc": "path of the input file"}),
    pa.field("source_record", pa.string(), nullable=False,
             metadata={"doc": "position in the file: 'line:N', 'index:N', with ':msg:<id>' or ':chosen' suffixes"}),
    pa.field("source_offset", pa.int64(),
             metadata={"doc": "byte offset of the raw record in the decompressed file"}),
    pa.field("source_length", pa.int64(), metadata={"doc": "byte length of the raw record"}),
    pa.field("source_sha256", pa.string(), nullable=False, metadata={"doc": "sha256 of the input file as stored"}),
    pa.field("format", pa.string(), nullable=False, metadata={"doc": "reader that parsed the record"}),
    pa.field("kind", pa.string(), nullable=False,
             metadata={"doc": "'conversation' (ends in an assistant answer) or 'prompt' (no answer)"}),
    pa.field("rank_group", pa.string(),
             metadata={"doc": "rows ranked against each other by a human or judge (OASST siblings, HH pair, AlpacaEval judgement)"}),
    pa.field("rank", pa.float64(), metadata={"doc": "position within rank_group, 0 is best"}),
    pa.field("source_flags", pa.list_(pa.string()),
             metadata={"doc": "facts the source states about the record, e.g. 'deleted', 'review_failed', 'synthetic'"}),
]

# Columns filled by stages.
STAGE_FIELDS = [
    pa.field("language", pa.string(), metadata={"doc": "ISO 639-1 code of the conversation (filter stage)"}),
    pa.field("language_score", pa.float64(), metadata={"doc": "the language identifier's probability for language"}),
    pa.field("n_turns", pa.int32(), metadata={"doc": "number of messages"}),
    pa.field("prompt_chars", pa.int64(), metadata={"doc": "characters before the final assistant turn"}),
    pa.field("answer_chars", pa.int64(), metadata={"doc": "characters of the final assistant turn"}),
    pa.field("content_hash", pa.string(), metadata={"doc": "hash of the normalised conversation (exact dedup)"}),
    pa.field("dup_cluster", pa.string(), metadata={"doc": "id of the row kept for this duplicate cluster"}),
    pa.field("score", pa.float64(), metadata={"doc": "scorer output for the final answer"}),
    pa.field("scorer", pa.string(), metadata={"doc": "name of the model that produced score"}),
]

RECORD_SCHEMA = pa.schema(ORIGIN_FIELDS + STAGE_FIELDS)

# Rejections carry the origin so a rejected row can be traced without a join.
REJECTED_SCHEMA = pa.schema([
    pa.field("id", pa.string(), nullable=False),
    pa.field("source", pa.string(), nullable=False),
    pa.field("source_file", pa.string(), nullable=False),
    pa.field("source_record", pa.string(), nullable=False),
    pa.field("stage", pa.string(), nullable=False, metadata={"doc": "stage that dropped the row"}),
    pa.field("reason", pa.string(), nullable=False, metadata={"doc": "machine-readable reason, e.g. 'refusal'"}),
    pa.field("detail", pa.string(), metadata={"doc": "human-readable evidence, e.g. the matched phrase"}),
    pa.field("duplicate_of", pa.string(), metadata={"doc": "id of the row this one duplicated"}),
    pa.field("score", pa.float64(), metadata={"doc": "scorer output, when the row was scored before it was dropped"}),
    pa.field("messages", MESSAGES),
])

QUARANTINE_SCHEMA = pa.schema([
    pa.field("source", pa.string(), nullable=False),
    pa.field("source_file", pa.string(), nullable=False),
    pa.field("line", pa.int64(), metadata={"doc": "1-based line (line formats) or 0-based array index"}),
    pa.field("offset", pa.int64(), metadata={"doc": "byte offset in the decompressed file"}),
    pa.field("error", pa.string(), nullable=False),
    pa.field("raw", pa.binary(), metadata={"doc": "the raw bytes, as read"}),
])

PROVENANCE_FIELDS = [
    pa.field("id", pa.string(), nullable=False),
    pa.field("prompt_id", pa.string()),
    pa.field("source", pa.string()),
    pa.field("source_file", pa.string()),
    pa.field("source_record", pa.string()),
    pa.field("generator", pa.string()),
]

# TRL conversational layout: a "messages" column of {role, content}.
SFT_SCHEMA = pa.schema([
    pa.field("messages", MESSAGES, nullable=False),
    *PROVENANCE_FIELDS,
    pa.field("language", pa.string()),
    pa.field("score", pa.float64()),
    pa.field("scorer", pa.string()),
    pa.field("n_candidates", pa.int32(), metadata={"doc": "answers to this prompt that competed"}),
])

# TRL conversational preference layout: prompt / chosen / rejected as message lists.
PREFERENCE_SCHEMA = pa.schema([
    pa.field("prompt", MESSAGES, nullable=False),
    pa.field("chosen", MESSAGES, nullable=False),
    pa.field("rejected", MESSAGES, nullable=False),
    pa.field("prompt_id", pa.string()),
    pa.field("chosen_id", pa.string(), nullable=False),
    pa.field("rejected_id", pa.string(), nullable=False),
    pa.field("chosen_score", pa.float64()),
    pa.field("rejected_score", pa.float64()),
    pa.field("chosen_generator", pa.string()),
    pa.field("rejected_generator", pa.string()),
    pa.field("pair_source", pa.string(), nullable=False,
             metadata={"doc": "'native' (human or judge ranking in the source), 'anchored' (two answers each judged against one shared anchor answer) or 'score' (scorer margin)"}),
    pa.field("source", pa.string()),
    pa.field("language", pa.string()),
])

# Prompt-only rows (evaluation questions): TRL prompt-only layout.
PROMPT_SCHEMA = pa.schema([
    pa.field("prompt", MESSAGES, nullable=False),
    *PROVENANCE_FIELDS,
    pa.field("language", pa.string()),
])

# One row per parsed input record (quarantined records are only in quarantine/): where it came
# from, every value a stage computed for it (kept even when a later stage dropped the row) and its
# final disposition. ``curate audit`` reads it.
_ORIGIN = {f.name: f for f in ORIGIN_FIELDS}
_NEVER_REACHED = "; null when the row never reached the stage that sets it"
_LINEAGE_DOCS = {
    "prompt_id": "hash of the normalised conversation before the final assistant turn; null when normalise "
                 "rejected the row",
    "dup_cluster": "id of the row kept for the row's duplicate cluster (dedup or semantic_dedup): for a dropped "
                   "duplicate the row it duplicated, for a keeper its own id; null without duplicates",
    "score": "scorer output for the final answer; null when the row was not scored (no scorer, or dropped before "
             "scoring and not ranked in a native pair group)",
}


def _lineage_field(field: pa.Field) -> pa.Field:
    doc = _LINEAGE_DOCS.get(field.name) or (field.metadata or {}).get(b"doc", b"").decode() + _NEVER_REACHED
    return field.with_metadata({"doc": doc})


LINEAGE_SCHEMA = pa.schema([
    *[_ORIGIN[name] for name in ("id", "source", "source_file", "source_record", "source_offset", "source_length",
                                 "source_sha256", "format", "kind", "generator")],
    _lineage_field(_ORIGIN["prompt_id"]), _ORIGIN["rank_group"], _ORIGIN["rank"],
    *[_lineage_field(field) for field in STAGE_FIELDS],
    pa.field("outputs", pa.list_(pa.string()), nullable=False,
             metadata={"doc": "outputs the row appears in, of 'sft', 'preference' (either side), 'prompts'; empty "
                              "when rejected"}),
    pa.field("stage", pa.string(), metadata={"doc": "stage that dropped the row, as in rejected/; null when kept"}),
    pa.field("reason", pa.string(), metadata={"doc": "why the row was dropped; null when kept"}),
    pa.field("detail", pa.string(), metadata={"doc": "evidence for reason; null when kept"}),
    pa.field("duplicate_of", pa.string(), metadata={"doc": "id of the row a dropped duplicate duplicated"}),
    _ORIGIN["source_flags"],
    pa.field("funnel_stage", pa.string(),
             metadata={"doc": "for a row kept only as a side of a preference pair: the stage that dropped it from "
                              "the SFT/prompt funnel (the row is kept, so stage is null)"}),
    pa.field("funnel_reason", pa.string(), metadata={"doc": "reason given by funnel_stage"}),
    pa.field("funnel_detail", pa.string(), metadata={"doc": "detail given by funnel_stage"}),
])

OUTPUT_SCHEMAS = {
    "record": RECORD_SCHEMA,
    "sft": SFT_SCHEMA,
    "preference": PREFERENCE_SCHEMA,
    "prompts": PROMPT_SCHEMA,
    "rejected": REJECTED_SCHEMA,
    "quarantine": QUARANTINE_SCHEMA,
    "lineage": LINEAGE_SCHEMA,
}


def empty_records() -> pa.Table:
    return RECORD_SCHEMA.empty_table()


def conform(table: pa.Table, schema: pa.Schema) -> pa.Table:
    """Add missing nullable columns as nulls, order and cast to ``schema``.

    Raises ValueError naming the first column that is missing and not nullable.
    """
    columns = []
    for field in schema:
        if field.name in table.column_names:
            columns.append(table.column(field.name).cast(field.type))
        elif field.nullable:
            columns.append(pa.nulls(table.num_rows, field.type))
        else:
            raise ValueError(f"column '{field.name}' is missing; every {schema_name(schema)} table needs it")
    return pa.Table.from_arrays(columns, schema=schema)


def schema_name(schema: pa.Schema) -> str:
    for name, candidate in OUTPUT_SCHEMAS.items():
        if candidate.equals(schema):
            return name
    return "schema"
