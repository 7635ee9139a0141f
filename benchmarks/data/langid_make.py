"""Rebuild benchmarks/data/langid_set.jsonl, the labelled language-ID set, from its sources.

Every text is real, written by people, and labelled by its source (see README.md beside this file):
short sentences from spaCy's per-language example sentences, longer paragraphs of consecutive
Django interface translations, and English OpenAssistant messages from the shared data. Only
languages that langdetect, fastText lid.176 and lingua all know are kept, so every engine is
judged on the same lines. Run: ``python benchmarks/data/langid_make.py`` (downloads the two
wheels with pip, no install).
"""

from __future__ import annotations

import ast
import json
import re
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
OUT = HERE / "langid_set.jsonl"
SHARED = HERE.parent.parent.parent / "shared" / "data"
SPACY, DJANGO = "spacy==3.8.18", "django==5.2.19"
# langdetect ∩ lingua (fastText lid.176 knows all of them); 'no' is Norwegian Bokmål
LANGUAGES = set("af ar bg bn ca cs cy da de el en es et fa fi fr gu he hi hr hu id it ja ko lt lv mk mr nl no "
                "pa pl pt ro ru sk sl so sq sv sw ta te th tl tr uk ur vi zh".split())
ALIASES = {"nb": "no", "zh_Hans": "zh", "zh_Hant": "zh"}
PARAGRAPHS_PER_LANGUAGE = 8
STRINGS_PER_PARAGRAPH = 10
PLACEHOLDER = re.compile(r"%|\{|<|&|\\|_|\$")
CJK = re.compile(r"[\u3040-\u30ff\u4e00-\u9fff\uac00-\ud7af]")


def main() -> None:
    with tempfile.TemporaryDirectory() as tmp:
        subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "-q", "-d", tmp, SPACY, DJANGO],
                       check=True)
        spacy_wheel = next(Path(tmp).glob("spacy-*.whl"))
        django_wheel = next(Path(tmp).glob("django-*.whl"))
        rows = spacy_rows(spacy_wheel) + django_rows(django_wheel) + oasst_rows(SHARED / "oasst" / "en_30_tree.jsonl")
    with OUT.open("w", encoding="utf-8") as out:
        for row in rows:
            out.write(json.dumps(row, ensure_ascii=False) + "\n")
    print(f"{len(rows)} lines, {len({r['lang'] for r in rows})} languages -> {OUT}")


def spacy_rows(wheel: Path) -> list[dict]:
    rows = []
    with zipfile.ZipFile(wheel) as zf:
        for name in sorted(n for n in zf.namelist() if re.fullmatch(r"spacy/lang/[a-z]+/examples\.py", n)):
            lang = ALIASES.get(name.split("/")[2], name.split("/")[2])
            if lang not in LANGUAGES:
                continue
            tree = ast.parse(zf.read(name).decode("utf-8"))
            for node in ast.walk(tree):
                if isinstance(node, ast.Assign) and any(getattr(t, "id", "") == "sentences" for t in node.targets):
                    for sentence in ast.literal_eval(node.value):
                        rows.append({"text": sentence, "lang": lang, "source": f"{SPACY}:{name}"})
    return rows


def django_rows(wheel: Path) -> list[dict]:
    """Paragraphs of consecutive translated messages: real text, longer than one UI string."""
    by_locale: dict[str, list[tuple[str, str]]] = {}
    with zipfile.ZipFile(wheel) as zf:
        for name in sorted(n for n in zf.namelist() if n.endswith("/LC_MESSAGES/django.po")):
            locale = name.split("/")[-3]
            for text in po_strings(zf.read(name).decode("utf-8")):
                by_locale.setdefault(locale, []).append((name, text))
    rows = []
    for locale, strings in sorted(by_locale.items()):
        lang = ALIASES.get(locale, locale)
        if lang not in LANGUAGES or lang == "en":
            continue
        for start in range(0, min(len(strings), PARAGRAPHS_PER_LANGUAGE * STRINGS_PER_PARAGRAPH), STRINGS_PER_PARAGRAPH):
            chunk = strings[start:start + STRINGS_PER_PARAGRAPH]
            if len(chunk) < STRINGS_PER_PARAGRAPH:
                break
            files = sorted({f.split("/LC_MESSAGES")[0] for f, _ in chunk})
            rows.append({"text": " ".join(t for _, t in chunk), "lang": lang,
                         "source": f"{DJANGO}:{','.join(files)}"})
    return rows


def po_strings(po: str) -> list[str]:
    """Translated, non-fuzzy singular messages of a .po file that read as prose."""
    kept = []
    for entry in po.split("\n\n"):
        if "#, fuzzy" in entry or "msgid_plural" in entry:
            continue
        match = re.search(r'^msgstr ((?:".*"\n?)+)', entry + "\n", re.M)
        if not match:
            continue
        text = "".join(ast.literal_eval(part) for part in re.findall(r'".*"', match.group(1))).strip()
        words = len(text.split()) if not CJK.search(text) else len(text) // 2
        if text and words >= 4 and not PLACEHOLDER.search(text) and "\n" not in text:
            kept.append(text)
    return kept


def oasst_rows(path: Path) -> list[dict]:
    """English human and assistant messages, short and long, labelled 'en' by OpenAssistant."""
    rows = []

    def walk(message: dict) -> None:
        if message.get("lang") == "en" and message.get("text", "").strip():
            rows.append({"text": message["text"], "lang": "en", "source": f"shared/data/oasst/{path.name}"})
        for reply in message.get("replies", []):
            walk(reply)

    for line in path.read_text(encoding="utf-8").splitlines()[:10]:
        walk(json.loads(line)["prompt"])
    return rows


if __name__ == "__main__":
    main()
