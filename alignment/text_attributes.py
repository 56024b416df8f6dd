"""Attributes of an English response that code measures exactly: the ground truth of text users (issue 22).

    measure_all("Sure! Here are two tips:\n- Sleep early.\n- Drink water.\nWant more?")
    # {"words": 11, "list_items": 2, "formatting": 0, "question_back": 1, "example": 0, "exclamations": 1, ...}

Each measure is a deterministic pure function of the text (no model, no randomness), so a simulated user whose true
reward is a function of these numbers scores any model's sample exactly, as the persona world's parser scores world
sentences. Text is read as a model writes it: markdown lists and headings, curly quotes and apostrophes,
unicode bullets, trailing whitespace, an empty reply (every measure 0).
"""

from __future__ import annotations

import re
from collections.abc import Callable

WORD = re.compile(r"[A-Za-z0-9]+(?:['’][A-Za-z]+)*")
LIST_MARKER = r"^\s*(?:[-*+•‣◦–]|\d{1,2}[.)])\s+"
LIST_ITEM = re.compile(LIST_MARKER + r"\S", re.MULTILINE)
HEADING = re.compile(r"^\s{0,3}#{1,6}\s+\S", re.MULTILINE)
BOLD = re.compile(r"\*\*[^*\n]+\*\*|__[^_\n]+__")
SENTENCE_END = re.compile(r"[.!?]+(?=\s|$)")
EXAMPLE = re.compile(r"\b(?:for example|for instance|e\.g\.|such as|imagine)", re.IGNORECASE)
CONTRACTION = re.compile(r"\b[A-Za-z]+['’](?:t|s|re|ve|ll|d|m)\b", re.IGNORECASE)
GREETING = re.compile(r"^\W*(?:hi|hello|hey|greetings|good (?:morning|afternoon|evening)|dear)\b", re.IGNORECASE)
SIGN_OFF = re.compile(r"(?:hope (?:this|that) helps|best regards|kind regards|cheers|good luck|happy \w+ing)\W*$",
                      re.IGNORECASE)
SECOND_PERSON = {"you", "your", "yours", "yourself", "yourselves", "you're", "you’re", "you've", "you’ve",
                 "you'll", "you’ll", "you'd", "you’d"}


def words(text: str) -> list[str]:
    """The words of `text` (letters and digits, with an apostrophe inside: "don't", "it’s"); list markers ("1.",
    "-") are not words."""
    return WORD.findall(re.sub(LIST_MARKER, "", text, flags=re.MULTILINE))


def sentences(text: str) -> list[str]:
    """Non-empty sentences: split after runs of . ! ? and at line breaks (a list item is a sentence)."""
    parts = []
    for line in text.splitlines():  # the marker first: "1. Sleep early." is one sentence, not "1" and "Sleep early"
        parts += [p.strip() for p in SENTENCE_END.split(re.sub(LIST_MARKER, "", line))]
    return [p for p in parts if words(p)]


def word_count(text: str) -> float:
    return float(len(words(text)))


def list_items(text: str) -> float:
    """Lines that are bulleted (-, *, +, •, –) or numbered (1. or 1)) list items."""
    return float(len(LIST_ITEM.findall(text)))


def formatting(text: str) -> float:
    """Markdown headings plus bold spans."""
    return float(len(HEADING.findall(text)) + len(BOLD.findall(text)))


def question_back(text: str) -> float:
    """1 when the reply ends by asking the user something: its last sentence ends with a question mark."""
    stripped = text.rstrip()
    return float(stripped.endswith("?") and bool(words(stripped)))


def example(text: str) -> float:
    """Markers of a worked example: "for example", "for instance", "e.g.", "such as", "imagine"."""
    return float(len(EXAMPLE.findall(text)))


def exclamations(text: str) -> float:
    return float(text.count("!") + text.count("！"))


def contractions(text: str) -> float:
    """Informal contractions (don't, it's, we'll, I'm); curly apostrophes count."""
    return float(len(CONTRACTION.findall(text)))


def greeting_or_sign_off(text: str) -> float:
    """An opening greeting (hi, hello, dear ...) and a closing sign-off (hope this helps, cheers ...), 0 to 2."""
    stripped = text.strip()
    return float(bool(GREETING.search(stripped)) + bool(SIGN_OFF.search(stripped)))


def second_person(text: str) -> float:
    """Share of the words that address the reader (you, your, you're ...); 0 for an empty reply."""
    found = [w.lower() for w in words(text)]
    return sum(w in SECOND_PERSON for w in found) / len(found) if found else 0.0


def sentence_length(text: str) -> float:
    """Mean words per sentence; 0 for an empty reply."""
    found = sentences(text)
    return sum(len(words(s)) for s in found) / len(found) if found else 0.0


def summary_first(text: str) -> float:
    """1 when the reply opens with a one-line summary: a first line of at most 20 words, then more text below it."""
    lines = [line for line in text.strip().splitlines() if line.strip()]
    return float(len(lines) >= 2 and 0 < len(words(lines[0])) <= 20 and not LIST_ITEM.match(lines[0]))


MEASURES: dict[str, Callable[[str], float]] = {
    "words": word_count,
    "list_items": list_items,
    "formatting": formatting,
    "question_back": question_back,
    "example": example,
    "exclamations": exclamations,
    "contractions": contractions,
    "greeting_or_sign_off": greeting_or_sign_off,
    "second_person": second_person,
    "sentence_length": sentence_length,
    "summary_first": summary_first,
}


def measure_all(text: str) -> dict[str, float]:
    """Every measure of MEASURES on one reply."""
    return {name: fn(text) for name, fn in MEASURES.items()}
