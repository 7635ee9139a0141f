"""Language identification behind one small function, so engines can be swapped.

langdetect costs about 2 ms per text in pure Python. Inputs can be split over worker
processes started as ``python -m curation.language`` (texts in as JSON on stdin, results
out on stdout): unlike a multiprocessing pool this never forks a process running Polars
threads and never re-imports the caller's __main__. Workers are off by default: on the
2-vCPU development machine two CPU-bound processes each run at half speed, and the filter
stage over all 54k AlpacaEval answers took 89.6 s with 2 workers against 98.4 s in-process.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ENGINES = ("langdetect",)
UNDETERMINED = "und"
_SOURCE_ROOT = str(Path(__file__).resolve().parent.parent)


def detect_languages(texts: list[str], engine: str = "langdetect",
                     processes: int = 1) -> tuple[list[str], list[float]]:
    """ISO 639-1 code and probability of the most likely language of each text.

    Deterministic (seeded). Each distinct text is detected once. A text with no letters
    gets ``'und'`` with probability 0. ``processes`` > 1 splits the work over that many
    worker processes (worth it only on machines with real spare cores).
    """
    if engine not in ENGINES:
        raise ValueError(f"unknown language engine '{engine}'; use one of: {', '.join(ENGINES)}")
    unique = list(dict.fromkeys(texts))
    processes = max(1, min(processes, len(unique)))
    results = [_langdetect(text) for text in unique] if processes == 1 else _in_workers(unique, processes)
    found = dict(zip(unique, results, strict=True))
    return [found[text][0] for text in texts], [found[text][1] for text in texts]


def _in_workers(texts: list[str], processes: int) -> list[tuple[str, float]]:
    chunks = [texts[i::processes] for i in range(processes)]
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [_SOURCE_ROOT, os.environ.get("PYTHONPATH")])))

    def run(chunk: list[str]) -> list[tuple[str, float]]:
        worker = subprocess.run([sys.executable, "-m", "curation.language"], input=json.dumps(chunk).encode(),
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
    # langdetect tells zh-cn from zh-tw; the record schema holds ISO 639-1
    return ranked[0].lang.split("-")[0], float(ranked[0].prob)


if __name__ == "__main__":
    json.dump([_langdetect(text) for text in json.loads(sys.stdin.buffer.read())], sys.stdout)
