"""The visual report: ``OUT_DIR/report.html``, one self-contained page (plotly.js inlined, no network).

What a person wants to see of a build before trusting it: the funnel per source and stage, score,
length and language distributions of kept vs dropped rows, duplicate cluster sizes, the top
rejection reasons with real rows, and a searchable sample of kept and rejected rows, each with the
``curate audit`` command that explains it. Per-row values come from ``lineage/`` when the build has
it, else from the outputs and ``rejected/``. Histograms are binned here and only a sample of rows
is embedded, so the page stays a few MB whatever the build's size.

Safety: row text is untrusted. It reaches the page only as JSON inside
``<script type="application/json">`` (with ``<``, ``>``, ``&`` escaped) rendered via ``textContent``,
or HTML-escaped server side; plot labels are HTML-escaped before plotly renders them.
"""

from __future__ import annotations

import html
import json
import math
import shlex
from pathlib import Path

import numpy as np
import plotly.colors
import plotly.graph_objects as go
import polars as pl
from pydantic import BaseModel, ConfigDict, Field

from curation.card import model_digest, read_manifest, source_summary
from curation.outputs import output_paths, write_bytes_atomic

REPORT_NAME = "report.html"
KEPT_COLOR = "#2a9d8f"
DROPPED_COLOR = "#d1495b"
STAGE_COLORS = ["#e76f51", "#f4a261", "#e9c46a", "#8d6cab", "#457b9d", "#b5838d", "#6d6875", "#264653"]
# one colour per source, distinct for up to 20 sources
SOURCE_COLORS = plotly.colors.qualitative.Plotly + plotly.colors.qualitative.Pastel
CLUSTER_BINS = ((2, 2), (3, 3), (4, 4), (5, 5), (6, 10), (11, 20), (21, 50), (51, 100), (101, None))


class ReportConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")
    sample_kept: int = Field(200, ge=0, description="kept rows embedded in the sample browser (spread over sources)")
    sample_rejected: int = Field(200, ge=0,
                                 description="rejected rows embedded in the sample browser (spread over reasons)")
    top_reasons: int = Field(12, ge=1, description="rejection reasons shown in the chart and with examples")
    examples_per_reason: int = Field(3, ge=0, description="real rows shown under each top rejection reason")
    top_clusters: int = Field(10, ge=0, description="largest duplicate clusters listed under the cluster chart")
    text_chars: int = Field(600, ge=80, description="characters of conversation text shown per row")
    bins: int = Field(40, ge=5, le=200, description="histogram bins for scores and lengths")


# --- per-row data -------------------------------------------------------------------------------

def _answer_chars(messages: pl.Expr) -> pl.Expr:
    last = messages.list.last()
    return pl.when(last.struct.field("role") == "assistant").then(
        last.struct.field("content").str.len_chars().cast(pl.Int64))


def _scan(paths: list[Path]) -> pl.LazyFrame | None:
    return pl.scan_parquet(paths) if paths else None


def load_records(out_dir: str | Path, manifest: dict) -> pl.DataFrame:
    """One row per parsed input record: origin, stage values and disposition (stage null = kept).

    From ``lineage/`` when the build wrote it; otherwise rebuilt from the outputs and
    ``rejected/`` (then rejected rows have no language and only duplicates that stayed rejected
    have a cluster).
    """
    out_dir = Path(out_dir)
    lineage = output_paths(out_dir, manifest, "lineage")
    if lineage and all(p.is_file() for p in lineage):
        return pl.read_parquet(lineage)
    parts = []
    if (scan := _scan(output_paths(out_dir, manifest, "rejected"))) is not None:
        parts.append(scan.select("id", "source", "source_file", "source_record", "stage", "reason", "detail",
                                 "duplicate_of", "score", _answer_chars(pl.col("messages")).alias("answer_chars"),
                                 pl.col("duplicate_of").alias("dup_cluster"),
                                 pl.lit([], dtype=pl.List(pl.String)).alias("outputs")))
    kept = []
    if (scan := _scan(output_paths(out_dir, manifest, "sft"))) is not None:
        kept.append(scan.select("id", "source", "source_file", "source_record", "language", "score", "scorer",
                                _answer_chars(pl.col("messages")).alias("answer_chars"),
                                pl.lit("sft").alias("output")))
    if (scan := _scan(output_paths(out_dir, manifest, "preference"))) is not None:
        for side in ("chosen", "rejected"):
            kept.append(scan.select(pl.col(f"{side}_id").alias("id"), "source", "language",
                                    pl.col(f"{side}_score").alias("score"),
                                    _answer_chars(pl.col(side)).alias("answer_chars"),
                                    pl.lit("preference").alias("output")))
    if (scan := _scan(output_paths(out_dir, manifest, "prompts"))) is not None:
        kept.append(scan.select("id", "source", "source_file", "source_record", "language",
                                pl.lit("prompts").alias("output")))
    if kept:
        merged = pl.concat(kept, how="diagonal_relaxed").group_by("id").agg(
            pl.exclude("output").drop_nulls().first(), pl.col("output").unique().sort().alias("outputs"))
        parts.append(merged)
    if not parts:
        return pl.DataFrame(schema={"id": pl.String, "source": pl.String, "stage": pl.String})
    return pl.concat(parts, how="diagonal_relaxed").collect()


def _conversation(frame: pl.LazyFrame, id_column: str, *message_columns: str) -> pl.LazyFrame:
    messages = pl.concat_list([pl.col(c) for c in message_columns]) if len(message_columns) > 1 \
        else pl.col(message_columns[0])
    return frame.select(pl.col(id_column).alias("id"), messages.alias("messages"))


def message_lookup(out_dir: str | Path, manifest: dict, ids: list[str]) -> dict[str, list[dict]]:
    """The conversation of each requested id, read from whichever output holds it."""
    out_dir = Path(out_dir)
    wanted = pl.Series(ids, dtype=pl.String).unique().implode()
    frames = []
    for name, id_column, columns in (("sft", "id", ("messages",)), ("prompts", "id", ("prompt",)),
                                     ("preference", "chosen_id", ("prompt", "chosen")),
                                     ("preference", "rejected_id", ("prompt", "rejected")),
                                     ("rejected", "id", ("messages",))):
        if (scan := _scan(output_paths(out_dir, manifest, name))) is not None:
            frames.append(_conversation(scan.filter(pl.col(id_column).is_in(wanted)), id_column, *columns))
    if not frames:
        return {}
    found = pl.concat(frames).unique("id", keep="first").collect()
    return dict(zip(found["id"].to_list(), found["messages"].to_list()))


def _clip(text: str, limit: int) -> str:
    text = text or ""
    return text if len(text) <= limit else text[: max(limit - 1, 0)].rstrip() + "…"


def preview(messages: list[dict] | None, limit: int) -> str:
    """The last prompt turn and the answer, clipped to about ``limit`` characters."""
    if not messages:
        return ""
    answer = messages[-1] if messages[-1]["role"] == "assistant" else None
    before = messages[:-1] if answer else messages
    prompt = before[-1] if before else None
    lines = []
    if len(before) > 1:
        lines.append(f"[{len(before) - 1} earlier message{'s' if len(before) > 2 else ''}]")
    if prompt:
        lines.append(f"{prompt['role'].upper()}: " + _clip(prompt["content"], limit * 2 // 5 if answer else limit))
    if answer:
        lines.append("ASSISTANT: " + _clip(answer["content"], limit * 3 // 5))
    return "\n".join(lines)


# --- figures ------------------------------------------------------------------------------------

def _label(text) -> str:
    """Plotly renders a subset of HTML in labels: escape names that come from recipes or data."""
    return html.escape(str(text), quote=False)


def _layout(fig: go.Figure, title: str, **extra) -> go.Figure:
    settings = {"title": {"text": _label(title), "x": 0.01}, "template": "plotly_white", "height": 430,
                "margin": {"l": 60, "r": 20, "t": 60, "b": 50}, "legend": {"orientation": "h", "y": -0.18},
                "font": {"size": 12}}
    fig.update_layout(**{**settings, **extra})
    return fig


def _no_data(fig: go.Figure, message: str) -> go.Figure:
    fig.add_annotation(text=_label(message), showarrow=False, x=0.5, y=0.5, xref="paper", yref="paper",
                       font={"size": 14, "color": "#666"})
    fig.update_xaxes(visible=False)
    fig.update_yaxes(visible=False)
    return fig


def stage_order(manifest: dict, records: pl.DataFrame) -> list[str]:
    order = [s for s in manifest.get("stages", {}) if s != "ingest"]
    seen = records["stage"].drop_nulls().unique().to_list() if "stage" in records.columns else []
    return order + sorted(s for s in seen if s not in order)


def stage_color(stages: list[str], stage: str) -> str:
    """The same colour for a stage in every chart; grey for pooled groups."""
    return STAGE_COLORS[stages.index(stage) % len(STAGE_COLORS)] if stage in stages else "#8a8f98"


def funnel_table(records: pl.DataFrame, manifest: dict) -> tuple[list[str], dict[str, list[int]]]:
    """Levels (input, after ingest, after each stage) and, per source, the rows still in at each level.

    Final dispositions: a row dropped by the funnel but kept as a preference pair side counts as in.
    """
    stages = stage_order(manifest, records)
    quarantined: dict[str, int] = {}
    for entry in manifest.get("inputs", []):
        quarantined[entry["source"]] = quarantined.get(entry["source"], 0) + entry.get("quarantined", 0)
    parsed = dict(records.group_by("source").len().iter_rows())
    dropped = {(source, stage): n for source, stage, n in
               records.filter(pl.col("stage").is_not_null()).group_by("source", "stage").len().iter_rows()}
    # a stage that dropped nothing would repeat the level before it (score never drops; disabled stages)
    stages = [s for s in stages if any(stage == s for _, stage in dropped)]
    levels = ["input records", "after ingest"] + [f"after {s}" for s in stages]
    sources = [s["name"] for s in manifest["recipe"]["sources"]]
    sources += sorted(set(parsed) - set(sources))
    table = {}
    for source in sources:
        alive = parsed.get(source, 0)
        values = [alive + quarantined.get(source, 0), alive]
        for stage in stages:
            alive -= dropped.get((source, stage), 0)
            values.append(alive)
        table[source] = values
    return levels, table


def funnel_figure(records: pl.DataFrame, manifest: dict) -> go.Figure:
    levels, table = funnel_table(records, manifest)
    totals = [sum(values[i] for values in table.values()) for i in range(len(levels))]
    labels = [f"{level} ({total:,})" for level, total in zip(levels, totals)]
    labels[-1] = f"kept ({totals[-1]:,})"
    fig = go.Figure()
    for index, (source, values) in enumerate(table.items()):
        if values[0]:
            fig.add_trace(go.Funnel(name=_label(source), y=labels, x=values, textinfo="none",
                                    marker_color=SOURCE_COLORS[index % len(SOURCE_COLORS)],
                                    hovertemplate=f"{_label(source)}<br>%{{y}}: %{{x:,}} rows<extra></extra>"))
    return _layout(fig, "Funnel: rows still in after each stage, per source", funnelmode="stack",
                   height=120 + 45 * len(levels), legend={"orientation": "v", "x": 1.02, "y": 1})


def _percent(counts: np.ndarray) -> np.ndarray:
    total = counts.sum()
    return counts * 100.0 / total if total else counts.astype(float)


def _groups(records: pl.DataFrame, column: str, stages: list[str], min_rows: int) -> list[tuple[str, np.ndarray]]:
    """(name, finite values) for kept rows and for rows dropped at each stage; stages with fewer than
    ``min_rows`` values are pooled (a histogram of 2 rows in percent is all spikes), and left out if still few."""
    finite = lambda frame: (v := frame[column].drop_nulls().to_numpy())[np.isfinite(v)]  # noqa: E731
    groups = [("kept", finite(records.filter(pl.col("stage").is_null())))]
    small = []
    for stage in stages:
        values = finite(records.filter(pl.col("stage") == stage))
        if values.size >= min_rows:
            groups.append((f"dropped at {stage}", values))
        elif values.size:
            small.append((stage, values))
    pooled = np.concatenate([values for _, values in small]) if small else np.array([])
    if pooled.size >= min_rows:
        groups.append((f"dropped at {', '.join(stage for stage, _ in small)}", pooled))
    return [(name, values) for name, values in groups if values.size]


def score_figure(records: pl.DataFrame, manifest: dict, config: ReportConfig) -> go.Figure:
    fig = go.Figure()
    if "score" not in records.columns or records["score"].drop_nulls().is_empty():
        return _no_data(_layout(fig, "Scores: kept vs dropped"), "no scores in this build (the recipe has no scorer)")
    stages = stage_order(manifest, records)
    groups = _groups(records, "score", stages, min_rows=20)
    edges = np.histogram_bin_edges(np.concatenate([values for _, values in groups]), bins=config.bins)
    centers = (edges[:-1] + edges[1:]) / 2
    for name, values in groups:
        counts = np.histogram(values, bins=edges)[0]
        color = KEPT_COLOR if name == "kept" else stage_color(stages, name.removeprefix("dropped at "))
        fig.add_trace(go.Bar(name=f"{name} ({values.size:,})", x=centers, y=_percent(counts), customdata=counts,
                             marker_color=color, opacity=0.65, width=float(edges[1] - edges[0]),
                             hovertemplate="score %{x:.2f}: %{customdata:,} rows (%{y:.1f}%)<extra></extra>"))
    return _layout(fig, "Scores: kept vs dropped (share of each group's scored rows)", barmode="overlay",
                   xaxis_title="score", yaxis_title="% of group")


def length_figure(records: pl.DataFrame, manifest: dict, config: ReportConfig) -> go.Figure:
    fig = go.Figure()
    if "answer_chars" not in records.columns or records["answer_chars"].drop_nulls().is_empty():
        return _no_data(_layout(fig, "Answer length"), "no answers")
    kept = records.filter(pl.col("stage").is_null())["answer_chars"].drop_nulls().to_numpy()
    dropped = records.filter(pl.col("stage").is_not_null())["answer_chars"].drop_nulls().to_numpy()
    logs = np.log10(np.concatenate([kept, dropped]).astype(float) + 1)
    edges = np.histogram_bin_edges(logs, bins=config.bins)
    for name, values, color in (("kept", kept, KEPT_COLOR), ("dropped", dropped, DROPPED_COLOR)):
        if not values.size:
            continue
        counts = np.histogram(np.log10(values.astype(float) + 1), bins=edges)[0]
        x = np.power(10, edges) - 1
        y = np.append(_percent(counts), 0)  # step line over the bin edges
        fig.add_trace(go.Scatter(name=f"{name} ({values.size:,})", x=np.maximum(x, 1), y=y, mode="lines",
                                 line={"shape": "hv", "color": color, "width": 2},
                                 customdata=np.append(counts, 0),
                                 hovertemplate="from %{x:,.0f} chars: %{customdata:,} rows (%{y:.1f}%)<extra></extra>"))
    return _layout(fig, "Answer length in characters: kept vs dropped", xaxis_type="log",
                   xaxis_title="characters of the final answer (log scale)", yaxis_title="% of group")


def language_figure(records: pl.DataFrame, top: int = 12) -> go.Figure:
    fig = go.Figure()
    if "language" not in records.columns:
        return _no_data(_layout(fig, "Languages"), "no language values in this build")
    language = pl.col("language").fill_null("none")
    counts = records.group_by(language, pl.col("stage").is_null().alias("kept")).len()
    order = counts.group_by("language").agg(pl.col("len").sum()).sort(["len", "language"], descending=[True, False])
    shown = [lang for lang in order["language"].to_list() if lang != "none"][:top]
    counts = counts.with_columns(pl.when(pl.col("language").is_in(shown) | (pl.col("language") == "none"))
                                 .then(pl.col("language")).otherwise(pl.lit("other")).alias("language")
                                 ).group_by("language", "kept").agg(pl.col("len").sum())
    categories = shown + [c for c in ("other", "none") if c in counts["language"].to_list()]
    for kept, name, color in ((True, "kept", KEPT_COLOR), (False, "dropped", DROPPED_COLOR)):
        part = dict(counts.filter(pl.col("kept") == kept).select("language", "len").iter_rows())
        fig.add_trace(go.Bar(name=name, x=[_label(c) for c in categories], y=[part.get(c, 0) for c in categories],
                             marker_color=color, hovertemplate="%{x}: %{y:,} rows<extra></extra>"))
    return _layout(fig, "Languages detected (none = not detected: row dropped before the language filter, "
                        "or no lineage)", barmode="group", yaxis_title="rows", yaxis={"type": "log", "dtick": 1})


def cluster_sizes(records: pl.DataFrame) -> pl.DataFrame:
    """(cluster, size, sources): duplicate clusters of two or more rows; cluster is the id of the row kept."""
    key = "dup_cluster" if "dup_cluster" in records.columns and records["dup_cluster"].drop_nulls().len() \
        else "duplicate_of"
    if key not in records.columns:
        return pl.DataFrame(schema={"cluster": pl.String, "size": pl.Int64, "sources": pl.List(pl.String)})
    members = records.filter(pl.col(key).is_not_null()).group_by(pl.col(key).alias("cluster")).agg(
        pl.len().cast(pl.Int64).alias("members"), (pl.col("id") == pl.col(key)).any().alias("self"),
        pl.col("source").unique().sort().alias("sources"))
    sized = members.select("cluster", (pl.col("members") + (~pl.col("self")).cast(pl.Int64)).alias("size"),
                           "sources")
    return sized.filter(pl.col("size") >= 2).sort(["size", "cluster"], descending=[True, False])


def cluster_figure(clusters: pl.DataFrame) -> go.Figure:
    fig = go.Figure()
    if clusters.is_empty():
        return _no_data(_layout(fig, "Duplicate clusters"), "no duplicate clusters")
    sizes = clusters["size"].to_numpy()
    labels, n_clusters, n_rows = [], [], []
    for low, high in CLUSTER_BINS:
        mask = (sizes >= low) & (sizes <= high if high else True)
        labels.append(str(low) if low == high else f"{low}-{high}" if high else f"{low}+")
        n_clusters.append(int(mask.sum()))
        n_rows.append(int(sizes[mask].sum()))
    fig.add_trace(go.Bar(x=labels, y=n_clusters, customdata=n_rows, marker_color="#457b9d",
                         hovertemplate="size %{x}: %{y:,} clusters, %{customdata:,} rows<extra></extra>",
                         name="clusters"))
    return _layout(fig, f"Duplicate clusters by size ({clusters.height:,} clusters, {int(sizes.sum()):,} rows; "
                        "one row kept per cluster)", xaxis_title="rows in the cluster", yaxis_title="clusters",
                   yaxis={"type": "log", "dtick": 1}, showlegend=False)


def reason_counts(records: pl.DataFrame) -> pl.DataFrame:
    return (records.filter(pl.col("stage").is_not_null()).group_by("stage", "reason").len()
            .sort(["len", "stage", "reason"], descending=[True, False, False]))


def reason_figure(reasons: pl.DataFrame, stages: list[str], top: int) -> go.Figure:
    fig = go.Figure()
    if reasons.is_empty():
        return _no_data(_layout(fig, "Rejection reasons"), "no rejected rows")
    shown = reasons.head(top).reverse()
    for stage in (s for s in stages if s in shown["stage"].to_list()):
        part = shown.filter(pl.col("stage") == stage)
        fig.add_trace(go.Bar(name=_label(stage), orientation="h", y=[_label(f"{stage}: {r}") for r in part["reason"]],
                             x=part["len"].to_list(), marker_color=stage_color(stages, stage),
                             hovertemplate="%{y}: %{x:,} rows<extra></extra>"))
    order = [_label(f"{s}: {r}") for s, r in shown.select("stage", "reason").iter_rows()]
    wide = shown["len"].max() > 100 * shown["len"].min()
    return _layout(fig, f"Top rejection reasons (final dispositions, {int(reasons['len'].sum()):,} rows rejected)",
                   xaxis={"title": {"text": "rows" + (" (log scale)" if wide else "")},
                          **({"type": "log", "dtick": 1} if wide else {})}, height=140 + 28 * shown.height,
                   yaxis={"categoryorder": "array", "categoryarray": order},
                   margin={"l": 240, "r": 20, "t": 60, "b": 50})


# --- samples ------------------------------------------------------------------------------------

def spread_sample(frame: pl.DataFrame, group: list[str], n: int) -> pl.DataFrame:
    """Up to ``n`` rows taken round-robin over groups, each group in id order (ids are hashes: a stable shuffle)."""
    if n <= 0 or frame.is_empty():
        return frame.head(0)
    ranked = frame.sort("id").with_columns(pl.int_range(pl.len()).over(group).alias("_rank"))
    return ranked.sort(["_rank", *group]).head(n).drop("_rank")


def _json_value(value):
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, list):
        return [_json_value(v) for v in value]
    return value


def _status(row: dict) -> str:
    if row.get("stage"):
        return f"rejected at {row['stage']}: {row.get('reason')}"
    outputs = row.get("outputs") or []
    text = "kept: " + (", ".join(outputs) if outputs else "yes")
    if row.get("funnel_stage"):
        text += f" (left the SFT funnel at {row['funnel_stage']}: {row.get('funnel_reason')})"
    return text


def browser_rows(sample: pl.DataFrame, texts: dict[str, list[dict]], audit_prefix: str,
                 limit: int) -> list[dict]:
    rows = []
    for row in sample.to_dicts():
        values = {k: _json_value(v) for k, v in row.items() if v is not None and v != [] and k != "id"}
        rows.append({"id": row["id"], "source": row.get("source") or "", "kept": not row.get("stage"),
                     "status": _status(row), "reason": row.get("reason") or "", "detail": row.get("detail") or "",
                     "score": _json_value(row.get("score")), "text": preview(texts.get(row["id"]), limit),
                     "audit": f"{audit_prefix} --id {row['id']}", "values": values})
    return rows


def _script_json(data) -> str:
    """JSON safe inside a <script> element: no '<', '>' or '&' survive unescaped."""
    text = json.dumps(data, ensure_ascii=False, separators=(",", ":"), allow_nan=False)
    return text.replace("&", "\\u0026").replace("<", "\\u003c").replace(">", "\\u003e")


# --- page ---------------------------------------------------------------------------------------

HEAD_SCRIPT = """
window.__report = {expected: %d, rendered: [], errors: []};
(function () {
  function mark() {
    var root = document.documentElement, r = window.__report;
    root.setAttribute('data-plots-rendered', String(r.rendered.length));
    root.setAttribute('data-js-errors', String(r.errors.length));
    var box = document.getElementById('js-errors');
    if (box) { box.textContent = r.errors.join('\\n'); box.hidden = r.errors.length === 0; }
    if (r.rendered.length === r.expected && r.browserReady) root.setAttribute('data-report-ready', '1');
  }
  window.__reportMark = mark;
  window.addEventListener('error', function (e) { window.__report.errors.push(String(e.message || e)); mark(); });
  window.addEventListener('unhandledrejection', function (e) {
    window.__report.errors.push('unhandled rejection: ' + String(e.reason)); mark(); });
  var consoleError = console.error;
  console.error = function () {
    window.__report.errors.push(Array.prototype.map.call(arguments, String).join(' ')); mark();
    return consoleError.apply(console, arguments);
  };
  window.__plotRendered = function (id) {
    var div = document.getElementById(id);
    if (div && div.querySelector('.main-svg') && window.__report.rendered.indexOf(id) < 0) {
      window.__report.rendered.push(id);
    }
    mark();
  };
})();
"""

BROWSER_SCRIPT = """
(function () {
  var data = JSON.parse(document.getElementById('report-data').textContent);
  var rows = data.rows, list = document.getElementById('rows'), search = document.getElementById('search');
  var status = document.getElementById('status-filter'), count = document.getElementById('row-count');
  function el(tag, cls, text) {
    var node = document.createElement(tag);
    if (cls) node.className = cls;
    if (text !== undefined && text !== null) node.textContent = String(text);
    return node;
  }
  function auditView(row, box) {
    var table = el('table', 'values');
    Object.keys(row.values).forEach(function (key) {
      var tr = el('tr'), value = row.values[key];
      tr.appendChild(el('th', '', key));
      tr.appendChild(el('td', '', Array.isArray(value) ? value.join(', ') : value));
      table.appendChild(tr);
    });
    box.appendChild(table);
  }
  rows.forEach(function (row) {
    var item = el('details', 'row ' + (row.kept ? 'kept' : 'rejected'));
    var summary = el('summary');
    summary.appendChild(el('span', 'badge', row.kept ? 'kept' : 'rejected'));
    summary.appendChild(el('code', 'rid', row.id));
    summary.appendChild(el('span', 'src', row.source));
    summary.appendChild(el('span', 'status', row.status));
    if (row.score !== null) summary.appendChild(el('span', 'score', 'score ' + Number(row.score).toFixed(2)));
    item.appendChild(summary);
    item.appendChild(el('pre', 'text', row.text));
    if (row.detail) item.appendChild(el('p', 'detail', row.detail));
    var cmd = el('p', 'audit');
    cmd.appendChild(el('code', '', row.audit));
    item.appendChild(cmd);
    var box = el('div', 'audit-view');
    item.appendChild(box);
    item.addEventListener('toggle', function () { if (item.open && !box.firstChild) auditView(row, box); });
    row.node = item;
    row.haystack = [row.id, row.source, row.status, row.reason, row.detail, row.text].join('\\n').toLowerCase();
    list.appendChild(item);
  });
  function apply() {
    var query = search.value.trim().toLowerCase(), want = status.value, shown = 0;
    rows.forEach(function (row) {
      var ok = (!query || row.haystack.indexOf(query) >= 0) &&
               (want === 'all' || (want === 'kept') === row.kept);
      row.node.hidden = !ok;
      if (ok) shown += 1;
    });
    count.textContent = shown + ' of ' + rows.length + ' rows';
    document.documentElement.setAttribute('data-rows-shown', String(shown));
  }
  search.addEventListener('input', apply);
  status.addEventListener('change', apply);
  apply();
  window.__report.browserReady = true;
  window.__reportMark();
})();
"""

STYLE = """
body { font: 14px/1.45 system-ui, -apple-system, "Segoe UI", sans-serif; margin: 0; color: #1d2733;
       background: #f6f7f9; }
header, main { max-width: 1200px; margin: 0 auto; padding: 0 20px; }
header { padding-top: 18px; }
h1 { font-size: 24px; margin: 6px 0; } h2 { font-size: 18px; margin: 0 0 8px; }
.meta { color: #5a6672; } .meta code { font-size: 12px; }
.cards { display: flex; gap: 12px; flex-wrap: wrap; margin: 14px 0; }
.card { background: #fff; border: 1px solid #dde1e6; border-radius: 8px; padding: 10px 16px; min-width: 120px; }
.card b { display: block; font-size: 22px; }
nav { margin: 8px 0 4px; } nav a { margin-right: 14px; color: #23527c; }
section { background: #fff; border: 1px solid #dde1e6; border-radius: 8px; padding: 16px; margin: 16px 0; }
table { border-collapse: collapse; font-size: 13px; margin: 8px 0; }
th, td { border-bottom: 1px solid #e5e8eb; padding: 4px 10px; text-align: left; vertical-align: top; }
td.num, th.num { text-align: right; font-variant-numeric: tabular-nums; }
pre { white-space: pre-wrap; word-break: break-word; background: #f3f5f7; padding: 8px; border-radius: 6px;
      margin: 6px 0; font-size: 12.5px; }
.example { border-left: 3px solid #e76f51; padding-left: 10px; margin: 10px 0; }
.controls { display: flex; gap: 10px; align-items: center; margin-bottom: 10px; }
#search { flex: 1; padding: 7px 10px; font-size: 14px; border: 1px solid #c3c9d0; border-radius: 6px; }
details.row { border: 1px solid #e1e5e9; border-radius: 6px; margin: 6px 0; padding: 4px 8px; }
details.row summary { cursor: pointer; display: flex; gap: 10px; align-items: baseline; flex-wrap: wrap; }
.badge { font-size: 11px; padding: 1px 6px; border-radius: 8px; color: #fff; background: #2a9d8f; }
details.rejected .badge { background: #e76f51; }
.rid { font-size: 12px; } .src { color: #457b9d; } .status { color: #5a6672; } .score { color: #6d6875; }
.audit code, .cmd { font-size: 12px; background: #eef1f4; padding: 2px 6px; border-radius: 4px; }
.detail { color: #8a4b2f; margin: 4px 0; }
table.values th { color: #5a6672; font-weight: normal; } table.values td { word-break: break-all; }
#js-errors { color: #b00020; }
"""


def _html_table(headers: list[str], rows: list[list], numeric: set[int] = frozenset()) -> str:
    head = "".join(f"<th{' class=num' if i in numeric else ''}>{html.escape(h)}</th>" for i, h in enumerate(headers))
    body = "".join("<tr>" + "".join(
        f"<td{' class=num' if i in numeric else ''}>{html.escape(f'{v:,}' if isinstance(v, int) else str(v))}</td>"
        for i, v in enumerate(row)) + "</tr>" for row in rows)
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def _examples_html(records: pl.DataFrame, reasons: pl.DataFrame, texts: dict, config: ReportConfig,
                   audit_prefix: str) -> str:
    parts = []
    for stage, reason, n in reasons.head(config.top_reasons).iter_rows():
        rows = (records.filter((pl.col("stage") == stage) & (pl.col("reason") == reason)).sort("id")
                .head(config.examples_per_reason))
        parts.append(f"<h3>{html.escape(f'{stage}: {reason}')} <small>({n:,} rows)</small></h3>")
        for row in rows.iter_rows(named=True):
            duplicate = row.get("duplicate_of")
            extra = f" · duplicate of <code>{html.escape(duplicate)}</code>" if duplicate else ""
            score = row.get("score")
            extra += f" · score {score:.2f}" if isinstance(score, float) and math.isfinite(score) else ""
            parts.append(
                f"<div class=example><div><code>{html.escape(row['id'])}</code> · {html.escape(row['source'] or '')}"
                f"{extra}</div><div class=detail>{html.escape(row.get('detail') or '')}</div>"
                f"<pre>{html.escape(preview(texts.get(row['id']), config.text_chars))}</pre>"
                f"<div><code class=cmd>{html.escape(audit_prefix + ' --id ' + row['id'])}</code></div></div>")
    return "\n".join(parts) or "<p>No rows were rejected.</p>"


def report_html(out_dir: str | Path, manifest: dict | None = None, config: ReportConfig | None = None) -> str:
    out_dir = Path(out_dir)
    manifest = read_manifest(out_dir) if manifest is None else manifest
    config = config or ReportConfig()
    records = load_records(out_dir, manifest)
    if "stage" not in records.columns:
        records = records.with_columns(pl.lit(None, dtype=pl.String).alias("stage"))
    stages = stage_order(manifest, records)
    reasons = reason_counts(records)
    clusters = cluster_sizes(records)
    audit_prefix = f"curate audit {shlex.quote(str(out_dir.resolve()))}"

    kept_sample = spread_sample(records.filter(pl.col("stage").is_null()), ["source"], config.sample_kept)
    rejected_sample = spread_sample(records.filter(pl.col("stage").is_not_null()), ["stage", "reason"],
                                    config.sample_rejected)
    example_ids = [row_id for stage, reason, _ in reasons.head(config.top_reasons).iter_rows()
                   for row_id in records.filter((pl.col("stage") == stage) & (pl.col("reason") == reason))
                   .sort("id").head(config.examples_per_reason)["id"].to_list()]
    cluster_ids = clusters.head(config.top_clusters)["cluster"].to_list()
    texts = message_lookup(out_dir, manifest, kept_sample["id"].to_list() + rejected_sample["id"].to_list()
                           + example_ids + cluster_ids)
    rows = browser_rows(pl.concat([kept_sample, rejected_sample], how="diagonal_relaxed"), texts, audit_prefix,
                        config.text_chars)

    figures = [
        ("fig-funnel", "funnel", funnel_figure(records, manifest)),
        ("fig-scores", "scores", score_figure(records, manifest, config)),
        ("fig-lengths", "lengths", length_figure(records, manifest, config)),
        ("fig-languages", "languages", language_figure(records)),
        ("fig-clusters", "dedup", cluster_figure(clusters)),
        ("fig-reasons", "reasons", reason_figure(reasons, stages, config.top_reasons)),
    ]
    plots = {}
    for index, (div_id, section, fig) in enumerate(figures):
        plots[section] = fig.to_html(full_html=False, include_plotlyjs=index == 0, div_id=div_id,
                                     default_height=f"{fig.layout.height}px", config={"displaylogo": False},
                                     post_script="window.__plotRendered('{plot_id}');")

    recipe, times = manifest["recipe"], manifest.get("times", {})
    counts = manifest.get("counts", {})
    select = manifest.get("stages", {}).get("select", {})
    cards = [("input records", counts.get("input_records", 0)), ("kept", counts.get("kept", 0)),
             ("rejected", counts.get("rejected", 0)), ("quarantined", counts.get("quarantined", 0)),
             ("SFT rows", select.get("sft_rows", 0)), ("preference pairs", select.get("preference_pairs", 0)),
             ("prompts", select.get("prompt_rows", 0))]
    source_rows = [[r["source"], r["files"], r["records_in"], r["quarantined"], r["rejected"], r["kept"],
                    r["sft_rows"], r["preference_pairs"], r["prompt_rows"], r["license"] or "not stated"]
                   for r in source_summary(out_dir, manifest).iter_rows(named=True)]
    stage_rows = [[stage, c.get("in", 0), c.get("out", 0), c.get("dropped", 0),
                   ", ".join(f"{k} {v:,}" for k, v in sorted((c.get("dropped_by_reason") or {}).items(),
                                                            key=lambda kv: -kv[1])),
                   times.get("stage_seconds", {}).get(stage, "")]
                  for stage, c in manifest.get("stages", {}).items()]
    model_rows = [[m.get("name", ""), m.get("kind", ""), m.get("model", ""), model_digest(m)]
                  for m in manifest.get("models", [])]
    cluster_rows = [[row["cluster"], row["size"], ", ".join(row["sources"]),
                     preview(texts.get(row["cluster"]), 160).replace("\n", "  ")]
                    for row in clusters.head(config.top_clusters).iter_rows(named=True)]
    tables = {
        "sources": _html_table(["source", "files", "records in", "quarantined", "rejected", "kept", "SFT rows",
                                "pairs", "prompts", "license"], source_rows, numeric=set(range(1, 9))),
        "stages": _html_table(["stage", "in", "out", "dropped", "dropped by reason", "seconds"], stage_rows,
                              numeric={1, 2, 3}),
        "clusters": _html_table(["row kept (cluster id)", "rows", "sources", "kept row"], cluster_rows, numeric={1})
        if cluster_rows else "<p>None.</p>",
        "models": _html_table(["name", "kind", "model", "sha256 (files + settings)"], model_rows)
        if model_rows else "<p>No model was used.</p>",
    }
    lineage_note = ("per-row values from <code>lineage/</code>" if output_paths(out_dir, manifest, "lineage")
                    else "no <code>lineage/</code> in this build: per-row values rebuilt from the outputs and "
                         "<code>rejected/</code>")
    conservation = "holds" if manifest.get("conservation", {}).get("ok") else "NOT CHECKED"
    e = html.escape
    links = "".join(f'<a href="#{anchor}">{label}</a>' for anchor, label in (
        ("funnel", "funnel"), ("scores", "scores"), ("lengths", "lengths"), ("languages", "languages"),
        ("dedup", "duplicates"), ("reasons", "rejections"), ("browser", "sample browser"), ("models", "models")))
    data = {"rows": rows, "audit_prefix": audit_prefix, "run_id": manifest["run_id"]}
    body = f"""<header>
<h1>{e(recipe['name'])} <small class=meta>build report</small></h1>
<div class=meta>run <code>{e(manifest['run_id'])}</code> · finished {e(str(times.get('finished', '')))}
 · {e(str(times.get('total_seconds', '')))} s · conservation {conservation} · {lineage_note}</div>
<p>{e(recipe.get('description') or '')}</p>
<div class=cards>{''.join(f'<div class=card>{e(label)}<b>{value:,}</b></div>' for label, value in cards)}</div>
<nav>{links}</nav>
<pre id="js-errors" hidden></pre>
</header>
<main>
<section id="funnel"><h2>Funnel</h2>
<p>Rows still in after each stage, stacked by source (final dispositions: a row the funnel dropped but a preference
pair kept counts as in). Hover for numbers; click a source in the legend to hide it.</p>
{plots['funnel']}
{tables['sources']}
<h3>Stages</h3>
{tables['stages']}
</section>
<section id="scores"><h2>Scores</h2>{plots['scores']}</section>
<section id="lengths"><h2>Answer lengths</h2>{plots['lengths']}</section>
<section id="languages"><h2>Languages</h2>{plots['languages']}</section>
<section id="dedup"><h2>Duplicates</h2>{plots['dedup']}
<h3>Largest clusters</h3>
{tables['clusters']}
</section>
<section id="reasons"><h2>Rejections</h2>{plots['reasons']}
<h3>Examples</h3>
<p>Real rows for each top reason (text clipped to {config.text_chars} characters); the command shows a row's
full trail.</p>
{_examples_html(records, reasons, texts, config, audit_prefix)}
</section>
<section id="browser"><h2>Sample browser</h2>
<p>{len(rows)} rows: up to {config.sample_kept} kept (spread over sources) and {config.sample_rejected} rejected
(spread over reasons). Search matches id, source, status, reason, evidence and text. Open a row for its recorded
values.</p>
<div class=controls>
<input id="search" type="search" placeholder="search id, source, reason, text…" autocomplete="off">
<select id="status-filter"><option value="all">kept and rejected</option><option value="kept">kept</option>
<option value="rejected">rejected</option></select><span id="row-count"></span></div>
<div id="rows"></div>
</section>
<section id="models"><h2>Models</h2>
{tables['models']}
</section>
</main>"""
    return f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><meta name="viewport" content="width=device-width, initial-scale=1">
<title>{e(recipe['name'])}: build report {e(manifest['run_id'])}</title>
<style>{STYLE}</style>
<script>{HEAD_SCRIPT % len(figures)}</script>
</head><body>
{body}
<script type="application/json" id="report-data">{_script_json(data)}</script>
<script>{BROWSER_SCRIPT}</script>
</body></html>
"""


def write_report(out_dir: str | Path, manifest: dict | None = None, config: ReportConfig | None = None) -> Path:
    """Write ``OUT_DIR/report.html`` atomically; like the card it is derived from the build, not in the manifest."""
    out_dir = Path(out_dir)
    path = out_dir / REPORT_NAME
    write_bytes_atomic(report_html(out_dir, manifest, config).encode("utf-8"), path)
    return path
