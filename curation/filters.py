"""Filter stage: reject rows whose answer or prompt is a known defect, with the evidence.

A row failing several rules is rejected once, by the first failing rule in this fixed order
(cheap rules first; language identification, milliseconds per text, runs last and only on
rows every other rule kept):

1. flags         source_flags from the reader           flag_<name>
2. length        turns, prompt, answer                  too_many_turns, too_short, too_long
3. boilerplate   final answer                           ai_disclaimer, refusal
4. truncation    final answer                           unclosed_code_block, ends_mid_sentence, trailing_ellipsis
5. repetition    final answer                           duplicate_paragraphs, duplicate_lines,
                                                        repeated_ngrams, duplicate_ngrams
6. language      prompt + answer, code removed          language

Answer rules read the final assistant turn only: it is what a trainer learns from, and earlier
assistant turns of a multi-turn row are context. The prompt is every message before the final
answer. Rows of kind 'prompt' have no answer: only flags, length (turns, prompt) and language
apply. Every default threshold was checked against the shared real data (see tests/test_filters.py).
"""

from __future__ import annotations

import re
from typing import Literal

import polars as pl
from pydantic import BaseModel, ConfigDict, Field, field_validator

import curation
from curation.hashing import hash_column
from curation.language import DEFAULT_ENGINE, DEFAULT_MIN_CONFIDENCE, ENGINES, detect_languages, engine_identity
from curation.record_cache import KEY, RecordCaches
from curation.stage import StageResult, empty_rejections, rejections

STAGE = "filter"
APOSTROPHES = r"[\x{2018}\x{2019}\x{02BC}\x{0060}\x{00B4}]"
FENCE = "```"
CODE_BLOCK = r"(?s)```.*?(```|\z)"
# Answer lines that read as code, dropped before phrase matching and language identification
# (code keywords such as const, let, def and return make langdetect call English rows French or
# Romanian). A code line is indented, opens with a keyword, a closing brace or a comment, ends
# with ; { or }, is an assignment or a bare call. Prompts keep every line: their prose often
# quotes code inline.
CODE_LINE = (r"(?m)^(?:[ \t]{4}|\t|\s*(?:\}|//|/\*)|\s*(?:def|class|import|from|return|function|const|let|var|"
             r"public|private|static|void|int|print|console\.log|#include|#!|package|using|SELECT|CREATE)\b"
             r"|\s*[\w.\[\]'\"]+\s*[-+*/%]?=[^=]|\s*[\w.]+\(.*\)\s*;?\s*$|.*[;{}]\s*$).*$")


class Rule(BaseModel):
    model_config = ConfigDict(extra="forbid")
    enabled: bool = Field(True, description="apply this rule")


class FlagRule(Rule):
    reject: list[str] = Field(["deleted", "review_failed"],
                              description="source_flags that reject a row, as reason 'flag_<name>'")


class LengthRule(Rule):
    max_turns: int = Field(64, description="most messages in a conversation")
    min_prompt_chars: int = Field(2, description="fewest characters before the final answer")
    max_prompt_chars: int = Field(24_000, description="most characters before the final answer")
    min_answer_chars: int = Field(1, description="fewest characters in the final answer")
    min_answer_words: int = Field(
        1, description="fewest words (or emoji) in the final answer: 1 rejects answers of bare punctuation")
    max_answer_chars: int = Field(24_000, description="most characters in the final answer")


def _lowered(phrases: list[str]) -> list[str]:
    """Phrases are matched on lower-cased text with straight apostrophes."""
    return [re.sub("[\u2018\u2019\u02bc`\u00b4]", "'", p.lower()) for p in phrases if p.strip()]


class BoilerplateRule(Rule):
    ai_disclaimer: bool = Field(True, description="reject answers with an AI self-disclaimer")
    refusal: bool = Field(True, description="reject answers that open with a refusal")
    ai_disclaimer_phrases: list[str] = Field([
        "as an ai language model", "as a language model", "as a large language model",
        "as an ai model", "as an ai assistant", "as an ai,", "as an ai developed", "as an ai created",
        "as an ai trained", "as an ai text", "as an ai system,", "as an artificial intelligence",
        "i am an ai language model", "i'm an ai language model", "i'm just an ai", "i am just an ai",
        "i'm only an ai", "i am only an ai", "i'm just a language model", "i am just a language model",
        "i don't have personal opinions", "i do not have personal opinions",
        "i don't have personal beliefs", "i do not have personal beliefs",
        "i don't have personal preferences", "i do not have personal preferences",
        "i don't have personal experiences", "i do not have personal experiences",
        "i don't have personal feelings", "i do not have personal feelings",
        "my knowledge cutoff", "my knowledge cut-off", "my last knowledge update", "my last training",
        "trained by openai", "developed by openai, i",
    ], description="phrases (case-insensitive, anywhere in the answer) giving reason 'ai_disclaimer'")
    refusal_phrases: list[str] = Field([
        "i'm sorry, but i cannot", "i'm sorry, but i can't", "i am sorry, but i cannot",
        "i'm sorry, i cannot", "i'm sorry, i can't", "i apologize, but i cannot", "i apologize, but i can't",
        "i'm really sorry, but i can't", "i cannot fulfill", "i can't fulfill", "i cannot comply", "i can't comply",
        "i cannot assist with", "i can't assist with", "i'm unable to assist", "i am unable to assist",
        "i cannot help with", "i can't help with", "i can't help you", "i cannot help you",
        "i'm not able to help", "i am not able to help", "i must decline", "i won't be able to help",
        "i cannot provide information on", "i can't provide information on",
        "i cannot create content", "i can't create content", "i'm not comfortable", "i am not comfortable",
        "against my programming",
    ], description="phrases giving reason 'refusal' when they occur within refusal_window of the answer start")
    refusal_window: int = Field(
        300, description="characters from the answer start searched for refusal phrases: a refusal opens "
        "the answer, while the same words deep in a long answer are usually a caveat")

    @field_validator("ai_disclaimer_phrases", "refusal_phrases")
    @classmethod
    def lower_phrases(cls, phrases: list[str]) -> list[str]:
        return _lowered(phrases)


class TruncationRule(Rule):
    unclosed_code_block: bool = Field(True, description="reject an odd number of ``` fence lines")
    ends_mid_sentence: bool = Field(
        True, description="reject answers ending in a comma, an opening bracket or a dangling word")
    min_last_line_words: int = Field(
        6, description="ends_mid_sentence judges only a last line of at least this many words: poems, "
        "signatures, hashtags and list items are short and end without punctuation by design")
    dangling_words: list[str] = Field([
        "a", "an", "the", "and", "or", "but", "nor", "of", "to", "into", "onto", "with", "for", "from",
        "by", "at", "as", "than", "that", "which", "whose", "because", "although", "though", "whereas",
        "unless", "whether", "is", "are", "was", "were", "has", "have", "had", "will", "would", "could",
        "should", "shall", "must", "my", "your", "our", "their", "its", "these", "those", "such", "including",
    ], description="English words a finished sentence does not end with")
    trailing_ellipsis: bool = Field(
        False, description="reject answers ending in '...'. Off: on the shared data every such answer was stylistic")

    @field_validator("dangling_words")
    @classmethod
    def lower_words(cls, words: list[str]) -> list[str]:
        return _lowered(words)


class RepetitionRule(Rule):
    """Gopher (Rae et al. 2021) repetition statistics over the final answer.

    Gopher's web-text thresholds (0.3 lines, 0.2 top 2-gram, 0.15..0.10 duplicate 5..10-grams)
    reject about 9% of the AlpacaEval answers, nearly all fine: chat answers repeat by design
    (song choruses, templated list items, code, tables). These defaults sit where, by eye on
    the shared data, what is rejected is degenerate looping output.
    """
    min_words_to_apply: int = Field(50, description="shorter answers are not judged")
    max_duplicate_paragraph_fraction: float = Field(0.5, description="repeated paragraphs / paragraphs")
    max_duplicate_paragraph_char_fraction: float = Field(0.6, description="characters in repeated paragraphs")
    max_duplicate_line_fraction: float = Field(0.7, description="repeated lines / lines")
    max_duplicate_line_char_fraction: float = Field(0.6, description="characters in repeated lines")
    max_top_ngram_fraction: dict[int, float] = Field(
        {2: 0.6, 3: 0.6, 4: 0.6},
        description="n -> most word characters covered by the single most frequent repeated n-gram")
    max_duplicate_ngram_fraction: dict[int, float] = Field(
        {5: 0.75, 6: 0.73, 7: 0.71, 8: 0.69, 9: 0.67, 10: 0.65},
        description="n -> most word characters covered by repeated occurrences of n-grams")


class LanguageRule(Rule):
    """Reject rows confidently in a language outside ``allow``.

    On the shared data langdetect's non-English calls below probability 0.9 were English rows
    (short maths answers called Danish, sudoku Italian) or English instructions with a
    translated answer (French at 0.57 to 0.86); at 0.9 and above they were German replies,
    Spanish recipes and degenerate output. Below about 60 letters it is unreliable at any
    probability ('Write "Test"' / 'Test.' came out German at 1.0), so such rows are not judged.
    """
    allow: list[str] = Field(["en"], description="ISO 639-1 codes to keep")
    min_confidence: float | None = Field(
        None, ge=0, le=1, description="a row is rejected when its most likely language is not allowed with at "
        "least this probability; less certain calls keep the row. Default: the engine's calibrated value "
        "(fasttext 0.5, langdetect 0.9, lingua 0.9)")
    min_letters: int = Field(60, description="texts with fewer letters are not judged (language left null)")
    max_chars: int = Field(1000, description="characters of prompt + answer given to the detector")
    engine: Literal[ENGINES] = Field(  # type: ignore[valid-type]
        DEFAULT_ENGINE, description="language identification engine: fasttext (default: lid.176, ~60x langdetect's "
        "speed, accuracy no lower on benchmarks/data/langid_set.jsonl), langdetect or lingua (see curation.language)")
    processes: int = Field(1, ge=1, description="worker processes for language identification (see curation.language)")

    @property
    def threshold(self) -> float:
        return self.min_confidence if self.min_confidence is not None else DEFAULT_MIN_CONFIDENCE[self.engine]


class FilterConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")
    flags: FlagRule = Field(default_factory=FlagRule)
    length: LengthRule = Field(default_factory=LengthRule)
    boilerplate: BoilerplateRule = Field(default_factory=BoilerplateRule)
    truncation: TruncationRule = Field(default_factory=TruncationRule)
    repetition: RepetitionRule = Field(default_factory=RepetitionRule)
    language: LanguageRule = Field(default_factory=LanguageRule)


def filter_records(records: pl.DataFrame, config: FilterConfig,
                   overrides: dict[str, FilterConfig] | None = None, cache: RecordCaches | None = None) -> StageResult:
    """``overrides``: source name -> the config used for that source's rows instead of ``config``.

    With ``cache``, each row's verdict (reason, detail, language, language_score) is cached by
    its content and the config that judged it: a rebuild judges only new or changed rows.
    """
    overrides = overrides or {}
    frame = records.with_row_index("_row")
    default_rows = frame.filter(~pl.col("source").is_in(list(overrides))) if overrides else frame
    parts = [(default_rows, config)] + [(frame.filter(pl.col("source") == name), cfg)
                                         for name, cfg in overrides.items()]
    verdicts, languages = [], []
    for part, cfg in parts:
        if part.height:
            verdict, language = _judge(part, cfg) if cache is None else _judge_cached(part, cfg, cache)
            verdicts.append(verdict)
            languages.append(language)
    verdict = pl.concat(verdicts) if verdicts else pl.DataFrame(schema={"_row": pl.UInt32, "reason": pl.String,
                                                                       "detail": pl.String})
    language = pl.concat(languages) if languages else verdict.select("_row").with_columns(
        language=pl.lit(None, pl.String), language_score=pl.lit(None, pl.Float64)).clear()

    kept = (frame.join(verdict, on="_row", how="anti")
            .join(language, on="_row", how="left", suffix="_new")
            .with_columns(language=pl.coalesce("language_new", "language"),
                          language_score=pl.coalesce("language_score_new", "language_score"))
            .sort("_row").select(records.columns))
    rejected = verdict.join(frame.select("_row", "id"), on="_row").sort("_row")
    out = rejections(rejected, STAGE, pl.col("reason"), pl.col("detail")) if rejected.height else empty_rejections()
    # the language of rows rejected for it, for the lineage
    values = language.join(rejected, on="_row", how="semi").join(frame.select("_row", "id"), on="_row")
    return StageResult(kept=kept, rejected=out, values=values.sort("_row").select("id", "language", "language_score"))


# Bump when the code changes a verdict for the same row and config (releases change the package version, which is
# hashed too).
CACHE_VERSION = 1
_VERDICT = {"reason": pl.String, "detail": pl.String, "language": pl.String, "language_score": pl.Float64}


def _judge_cached(part: pl.DataFrame, config: FilterConfig, cache: RecordCaches) -> tuple[pl.DataFrame, pl.DataFrame]:
    """``_judge`` with each distinct row judged once across builds.

    A verdict depends on the row's kind, messages and source_flags only (every rule reads one
    row), so those are the key; the whole config, the language engine's files and the package
    version name the cache folder. Every rule is cached, not only language identification: on
    the shared recipe the repetition statistics cost more than the detector.
    """
    settings = {"version": CACHE_VERSION, "package": curation.__version__, "config": config.model_dump(mode="json"),
                "language_engine": engine_identity(config.language.engine) if config.language.enabled else None}
    store = cache.open(STAGE, settings, values=_VERDICT)
    content = part["content_hash"]
    if content.null_count():  # normally filled by the normalise stage
        serial = part.select(pl.col("messages").list.eval(pl.element().struct.json_encode()).list.join("\n"))
        content = part.select(pl.coalesce(pl.col("content_hash"), hash_column(serial.to_series()))).to_series()
    flags = pl.col("source_flags").list.join("\x1f").fill_null("\x00")
    keyed = part.with_columns(_key=pl.concat_str(pl.col("kind").fill_null("\x00"), content, flags, separator="\x1d"))
    found = store.lookup(keyed["_key"])
    missing = keyed.join(found, left_on="_key", right_on=KEY, how="anti").unique("_key", maintain_order=True)
    if missing.height:
        verdict, language = _judge(missing, config)
        computed = (missing.select("_row", pl.col("_key").alias(KEY))
                    .join(verdict, on="_row", how="left").join(language, on="_row", how="left")
                    .select(KEY, *_VERDICT))
        store.store(computed)
        found = pl.concat([found, computed])
    judged = keyed.select("_row", "_key").join(found.rename({KEY: "_key"}), on="_key", how="left")
    return (judged.filter(pl.col("reason").is_not_null()).select("_row", "reason", "detail"),
            judged.filter(pl.col("language").is_not_null()).select("_row", "language", "language_score"))


def _texts(frame: pl.DataFrame) -> pl.DataFrame:
    is_conv = pl.col("kind") == "conversation"
    content = pl.element().struct.field("content")
    n = pl.col("messages").list.len()
    before = pl.when(is_conv).then(pl.col("messages").list.head(n - 1)).otherwise(pl.col("messages"))
    last = pl.col("messages").list.last()
    answer = pl.when(is_conv).then(last.struct.field("content"))
    return frame.select(
        "_row", "kind", "source_flags",
        _turns=n,
        _unanswered=is_conv & (last.struct.field("role").fill_null("") != "assistant"),
        _prompt=before.list.eval(content).list.join("\n\n"),
        _answer=answer,
    ).with_columns(
        _prompt_chars=pl.col("_prompt").str.len_chars(),
        _answer_chars=pl.col("_answer").str.len_chars(),
        # emoji count as words: an emoji-only reply to "answer with emojis" is an answer
        _answer_words=pl.col("_answer").str.count_matches(r"[\w\p{So}]+"),
    )


def _judge(part: pl.DataFrame, config: FilterConfig) -> tuple[pl.DataFrame, pl.DataFrame]:
    """(_row, reason, detail) of the rows rejected, and (_row, language, language_score) of every row identified."""
    texts = _texts(part)
    # the normalise stage guarantees this; a frame that skipped it must not slip through
    checks: list[tuple[pl.Expr, str | pl.Expr, pl.Expr]] = [
        (pl.col("_unanswered"), "no_answer", pl.lit("conversation does not end with an assistant turn; "
                                                    "run the normalise stage before filtering"))]
    if config.flags.enabled:
        checks += _flag_checks(config.flags)
    if config.length.enabled:
        checks += _length_checks(config.length)
    if config.boilerplate.enabled:
        checks += _boilerplate_checks(config.boilerplate)
    if config.truncation.enabled:
        checks += _truncation_checks(config.truncation)
    if config.repetition.enabled:
        texts = texts.join(repetition_stats(texts, config.repetition), on="_row", how="left")
        checks += _repetition_checks(config.repetition)

    first = pl.coalesce([
        pl.when(fails.fill_null(False)).then(pl.struct(reason=pl.lit(reason) if isinstance(reason, str) else reason,
                                                       detail=detail))
        for fails, reason, detail in checks])
    texts = texts.with_columns(_verdict=first)
    verdict = texts.filter(pl.col("_verdict").is_not_null()).select("_row", pl.col("_verdict").struct.unnest())
    survivors = texts.filter(pl.col("_verdict").is_null())

    if not config.language.enabled or survivors.is_empty():
        return verdict, survivors.select("_row", language=pl.lit(None, pl.String),
                                         language_score=pl.lit(None, pl.Float64)).clear()
    rule = config.language
    lid = (survivors.select("_row", _text=language_text(rule.max_chars))
           .filter(pl.col("_text").str.count_matches(r"\p{L}") >= rule.min_letters))
    codes, probs = detect_languages(lid["_text"].to_list(), rule.engine, rule.processes)
    lid = lid.with_columns(language=pl.Series(codes, dtype=pl.String),
                           language_score=pl.Series(probs, dtype=pl.Float64))
    wrong = ~pl.col("language").is_in(rule.allow) & (pl.col("language_score") >= rule.threshold)
    lang_reject = lid.filter(wrong).select(
        "_row", reason=pl.lit("language"),
        detail=pl.format("detected '{}' with probability {} (>= {}); allowed: {}", pl.col("language"),
                         pl.col("language_score").round(3), pl.lit(rule.threshold),
                         pl.lit(", ".join(rule.allow))))
    return pl.concat([verdict, lang_reject]), lid.select("_row", "language", "language_score")


def language_text(max_chars: int) -> pl.Expr:
    """Answer then prompt, without code or URLs, at most max_chars: half each unless one is shorter.

    The answer comes first because it is what a model learns to write, and because an engine
    that reads only a prefix (fastText reads 200 characters) then judges the answer, not a
    foreign-language passage quoted in the prompt ("Does Lucie have bread? <French story>").
    """
    def prose(text: pl.Expr) -> pl.Expr:
        return (text.fill_null("").str.replace_all(CODE_BLOCK, " ").str.replace_all(r"`[^`\n]*`", " ")
                .str.replace_all(r"https?://\S+", " ").str.strip_chars())
    prompt, answer = prose(pl.col("_prompt")), prose(pl.col("_answer").str.replace_all(CODE_LINE, ""))
    prompt_take = pl.max_horizontal(pl.lit(max_chars // 2), pl.lit(max_chars) - answer.str.len_chars())
    prompt = prompt.str.slice(0, prompt_take)
    answer = answer.str.slice(0, pl.lit(max_chars) - prompt.str.len_chars())
    return pl.concat_str([answer, prompt], separator="\n\n").str.strip_chars()


def _flag_checks(rule: FlagRule) -> list:
    flag = pl.col("source_flags").list.eval(pl.element().filter(pl.element().is_in(rule.reject))).list.first()
    return [(flag.is_not_null(), pl.format("flag_{}", flag), pl.format("the source marks this record '{}'", flag))]


def _length_checks(rule: LengthRule) -> list:
    is_conv = pl.col("kind") == "conversation"
    turns, p, a, w = pl.col("_turns"), pl.col("_prompt_chars"), pl.col("_answer_chars"), pl.col("_answer_words")
    return [
        (turns > rule.max_turns, "too_many_turns",
         pl.format("{} messages, more than max_turns={}", turns, rule.max_turns)),
        (p < rule.min_prompt_chars, "too_short",
         pl.format("prompt has {} characters, fewer than min_prompt_chars={}", p, rule.min_prompt_chars)),
        (p > rule.max_prompt_chars, "too_long",
         pl.format("prompt has {} characters, more than max_prompt_chars={}", p, rule.max_prompt_chars)),
        (is_conv & (a < rule.min_answer_chars), "too_short",
         pl.format("answer has {} characters, fewer than min_answer_chars={}", a, rule.min_answer_chars)),
        (is_conv & (w < rule.min_answer_words), "too_short",
         pl.format("answer has {} words, fewer than min_answer_words={}", w, rule.min_answer_words)),
        (is_conv & (a > rule.max_answer_chars), "too_long",
         pl.format("answer has {} characters, more than max_answer_chars={}", a, rule.max_answer_chars)),
    ]


def _boilerplate_checks(rule: BoilerplateRule) -> list:
    # prose only: "Hello, I am an AI language model!" as a string in a code answer is no disclaimer
    prose = pl.col("_answer").str.replace_all(CODE_BLOCK, " ").str.replace_all(CODE_LINE, "")
    low = prose.str.to_lowercase().str.replace_all(APOSTROPHES, "'")
    checks = []
    if rule.ai_disclaimer and rule.ai_disclaimer_phrases:
        hit = low.str.extract_many(rule.ai_disclaimer_phrases).list.first()
        checks.append((hit.is_not_null(), "ai_disclaimer", pl.format("answer contains '{}'", hit)))
    if rule.refusal and rule.refusal_phrases:
        hit = low.str.slice(0, rule.refusal_window).str.extract_many(rule.refusal_phrases).list.first()
        checks.append((hit.is_not_null(), "refusal",
                       pl.format("answer opens with a refusal: '{}' within its first {} characters",
                                 hit, pl.lit(rule.refusal_window))))
    return checks


def _truncation_checks(rule: TruncationRule) -> list:
    answer = pl.col("_answer")
    fences = answer.str.count_matches(FENCE)
    last_line = answer.str.extract(r"([^\n]*)\z")
    last_words = last_line.str.count_matches(r"\S+")
    tail = last_line.str.slice(-60)
    checks = []
    if rule.unclosed_code_block:
        checks.append((fences % 2 == 1, "unclosed_code_block",
                       pl.format("odd number of ``` fences ({}): a code block is never closed", fences)))
    if rule.ends_mid_sentence:
        last_word = answer.str.to_lowercase().str.replace_all(APOSTROPHES, "'").str.extract(r"([\p{L}']+)\z")
        dangling = last_word.is_in(rule.dangling_words) | answer.str.contains(r"[,(\[{&\-–—]\z")
        checks.append((dangling & (last_words >= rule.min_last_line_words) & (fences % 2 == 0), "ends_mid_sentence",
                       pl.format("answer stops mid-sentence: '…{}'", tail)))
    if rule.trailing_ellipsis:
        checks.append((answer.str.contains(r"(\.\.\.|…)\z"), "trailing_ellipsis",
                       pl.format("answer ends with an ellipsis: '…{}'", tail)))
    return checks


def _fraction(value: pl.Expr, total: pl.Expr) -> pl.Expr:
    return pl.when(total > 0).then(value / total).otherwise(0.0)


def repetition_stats(texts: pl.DataFrame, rule: RepetitionRule) -> pl.DataFrame:
    """Gopher repetition fractions of each answer with at least min_words_to_apply words.

    Lines and paragraphs: repeated occurrences (every one after the first) over the count, and
    their characters over all characters. N-grams run over lower-cased words; characters are
    word characters. top_n: characters of the most frequent n-gram times its count (only when
    it repeats) over all; dup_n: characters of words covered by a repeated occurrence of any
    n-gram, over all. Computed on the exploded words with rolling hashes, no Python per row.
    """
    rows = texts.filter(pl.col("_answer_words") >= rule.min_words_to_apply).select("_row", "_answer")

    def repeated(split: pl.Expr, name: str) -> list[pl.Expr]:
        items = split.list.eval(pl.element().str.strip_chars()).list.eval(pl.element().filter(pl.element() != ""))
        again = pl.element().filter(~pl.element().is_first_distinct())
        n, chars = items.list.len(), items.list.eval(pl.element().str.len_chars()).list.sum()
        return [_fraction(items.list.eval(again).list.len(), n).alias(f"{name}_frac"),
                _fraction(items.list.eval(again.str.len_chars()).list.sum(), chars).alias(f"{name}_char_frac")]

    answer = pl.col("_answer")
    stats = rows.select("_row", *repeated(answer.str.split("\n"), "line"),
                        *repeated(answer.str.replace_all(r"\n[ \t]*\n\s*", "\x00").str.split("\x00"), "para"))

    top_ns = sorted(rule.max_top_ngram_fraction)
    dup_ns = sorted(rule.max_duplicate_ngram_fraction)
    if not top_ns and not dup_ns:
        return stats
    words = (rows.select("_row", _w=answer.str.to_lowercase().str.extract_all(r"[\w']+"))
             .with_columns(_n=pl.col("_w").list.len().cast(pl.UInt32)))
    words = words.with_columns(_pos=pl.int_ranges(0, pl.col("_n"), dtype=pl.UInt32)).explode("_w", "_pos")
    # the row is mixed into every word hash so identical n-grams in different answers never meet
    words = words.with_columns(
        _len=pl.col("_w").str.len_chars().cast(pl.UInt32),
        _h1=pl.col("_w").hash(seed=0) + pl.col("_row").cast(pl.UInt64) * 0x9E3779B97F4A7C15,
    ).drop("_w")
    first, rest = dup_ns[:1], dup_ns[1:]
    ngrams = _ngram_fractions(words, top_ns, first)
    if rest:
        # A word covered by a repeated n-gram is covered by a repeated shorter one too, so
        # dup_n <= dup_first: longer n-grams are measured only where dup_first exceeds one of
        # their limits (elsewhere they stay null). This halves the cost on AlpacaEval.
        bound = min(rule.max_duplicate_ngram_fraction[n] for n in rest)
        maybe = ngrams.filter(pl.col(f"dup{first[0]}_frac") > bound)["_row"]
        ngrams = ngrams.join(_ngram_fractions(words.filter(pl.col("_row").is_in(maybe.implode())), [], rest),
                             on="_row", how="left")
    return stats.join(ngrams, on="_row", how="left")


def _ngram_fractions(words: pl.DataFrame, top_ns: list[int], dup_ns: list[int]) -> pl.DataFrame:
    """top_n and dup_n fractions from exploded words (_row, _n, _pos, _len, _h1), rows contiguous."""
    # rolling polynomial hash of each n-gram; UInt64 arithmetic wraps
    for n in range(2, max(top_ns + dup_ns) + 1):
        words = words.with_columns(
            (pl.col(f"_h{n - 1}") * 0x100000001B3 + pl.col("_h1").shift(-(n - 1))).alias(f"_h{n}"))
    words = words.with_row_index("_i")
    index = pl.col("_i")
    valid = {n: pl.col("_pos") + n <= pl.col("_n") for n in top_ns + dup_ns}
    words = words.with_columns(
        *[pl.when(valid[n]).then(pl.len().over(f"_h{n}")).alias(f"_count{n}") for n in top_ns],
        *[pl.when(valid[n]).then(pl.col("_len").rolling_sum(n).shift(-(n - 1))).alias(f"_chars{n}") for n in top_ns],
        # a word is covered when a repeated (not first) occurrence of an n-gram starts within n-1 words before it
        *[(valid[n] & (index != index.min().over(f"_h{n}"))).cast(pl.UInt8).rolling_max(n, min_samples=1)
          .alias(f"_cover{n}") for n in dup_ns],
    )
    total = pl.col("_len").sum()
    return words.group_by("_row").agg(
        # overlapping occurrences ("big big big") can count a character more than once: cap at 1
        *[_fraction((pl.col(f"_count{n}") * pl.col(f"_chars{n}")).filter(pl.col(f"_count{n}") > 1).max().fill_null(0),
                    total).clip(upper_bound=1.0).alias(f"top{n}_frac") for n in top_ns],
        *[_fraction(pl.col("_len").filter(pl.col(f"_cover{n}") == 1).sum(), total).alias(f"dup{n}_frac")
          for n in dup_ns],
    )


def _repetition_checks(rule: RepetitionRule) -> list:
    def over(column: str, limit: float, reason: str, what: str) -> tuple:
        value = pl.col(column)
        return (value > limit, reason, pl.format("{} {} > {}", pl.lit(what), value.round(3), pl.lit(limit)))

    checks = [
        over("para_frac", rule.max_duplicate_paragraph_fraction, "duplicate_paragraphs", "repeated paragraph fraction"),
        over("para_char_frac", rule.max_duplicate_paragraph_char_fraction, "duplicate_paragraphs",
             "character fraction in repeated paragraphs"),
        over("line_frac", rule.max_duplicate_line_fraction, "duplicate_lines", "repeated line fraction"),
        over("line_char_frac", rule.max_duplicate_line_char_fraction, "duplicate_lines",
             "character fraction in repeated lines"),
    ]
    checks += [over(f"top{n}_frac", limit, "repeated_ngrams", f"character fraction of the top {n}-gram")
               for n, limit in sorted(rule.max_top_ngram_fraction.items())]
    checks += [over(f"dup{n}_frac", limit, "duplicate_ngrams", f"character fraction in repeated {n}-grams")
               for n, limit in sorted(rule.max_duplicate_ngram_fraction.items())]
    return checks
