"""CaseOps: the frontier's lossless case transform, its exact inverse, and the byte sidecar rule.

Every leaderboard row from 1.0678 down tokenizes CaseOps text (docs/BYTES.md): each
maximal run of ASCII letters is lower-cased and its capitals move into marker symbols that
the tokenizer reserves (TITLE, ALLCAPS, CAPNEXT), and a marker character already in the text
is escaped with ESC, so nothing is ever silently altered. ``decode_caseops`` inverts
``encode_caseops`` exactly and accepts nothing else: a malformed or non-canonical text is a
``CaseOpsError`` naming the position. Scores stay in bits per byte of the *original* text
(docs/BYTES.md): ``original_byte_counts`` gives, from the surfaces of a document's pieces, the
UTF-8 bytes each piece contributes to the original, the per-token sidecar the shards carry.
"""

from __future__ import annotations

import re
from collections.abc import Iterable

TITLE = "\ue001"  # the next letter is a capital (the first of its word)
ALLCAPS = "\ue002"  # every letter of the word is a capital (a word of two or more letters)
CAPNEXT = "\ue003"  # the next letter, inside a word, is a capital
ESC = "\ue004"  # the next character is a literal marker character of the input
MARKERS = (TITLE, ALLCAPS, CAPNEXT, ESC)  # the tokenizer's user-defined symbols, ids 4..7 in this order
CASE_MARKERS = frozenset((TITLE, ALLCAPS, CAPNEXT))

_ENCODE_UNITS = re.compile(r"[A-Za-z]+|[\ue001-\ue004]")  # an ASCII word, or a marker character to escape
_DECODE_UNITS = re.compile(r"\ue004[\s\S]?|[A-Za-z\ue001-\ue003]+")  # an escape pair, or a marked word
_ANY_MARKER = re.compile(r"[\ue001-\ue004]")


class CaseOpsError(ValueError):
    """A text that is not the CaseOps transform of any text."""


def encode_caseops(text: str) -> str:
    """The CaseOps transform of ``text`` (``lossless_caps_caseops_v1``)."""
    return _ENCODE_UNITS.sub(_encode_unit, text)


def _encode_unit(match: re.Match[str]) -> str:
    word = match.group()
    if word in MARKERS:
        return ESC + word
    if word.islower():
        return word
    if len(word) >= 2 and word.isupper():
        return ALLCAPS + word.lower()
    if word[0].isupper() and word[1:].islower():  # "".islower() is False: a lone capital takes the next rule
        return TITLE + word.lower()
    rest = "".join(CAPNEXT + letter.lower() if letter.isupper() else letter for letter in word[1:])
    return (TITLE if word[0].isupper() else "") + word[0].lower() + rest


def decode_caseops(text: str) -> str:
    """The original text of a CaseOps ``text``; ``CaseOpsError`` unless ``text`` is exactly an encoder output.

    Structural faults (a marker inside a word or before a non-letter, a dangling marker, a
    capital letter) are named as such; any other text the encoder would not have written
    (ALLCAPS on one letter, TITLE where ALLCAPS belongs) fails the final re-encoding check.
    """
    decoded = _DECODE_UNITS.sub(lambda match: _decode_unit(match, len(text)), text)
    canonical = encode_caseops(decoded)
    if canonical != text:
        position = next((i for i, (a, b) in enumerate(zip(canonical, text)) if a != b), min(len(canonical), len(text)))
        raise CaseOpsError(f"character {position}: not the canonical CaseOps form (the encoder would write "
                           f"{canonical[position:position + 12]!r}, the text has {text[position:position + 12]!r})")
    return decoded


def _decode_unit(match: re.Match[str], text_length: int) -> str:
    unit, start = match.group(), match.start()
    if unit[0] == ESC:
        if len(unit) == 1:
            raise CaseOpsError(f"character {start}: dangling escape marker at the end of the text")
        if unit[1] not in MARKERS:
            raise CaseOpsError(f"character {start}: escape marker before {unit[1]!r}, which is no marker character")
        return unit[1]
    return _decode_word(unit, start, at_end=match.end() == text_length)


def _decode_word(unit: str, start: int, at_end: bool) -> str:
    """One run of lower-case letters and case markers back to its letters."""
    out: list[str] = []
    word_mode = ""  # TITLE or ALLCAPS seen before the word's first letter
    capnext = False
    for offset, char in enumerate(unit):
        where = f"character {start + offset}"
        if char in (TITLE, ALLCAPS):
            if out:
                raise CaseOpsError(f"{where}: word marker inside a word (invalid title marker placement)")
            if word_mode:
                raise CaseOpsError(f"{where}: two word markers before one word")
            word_mode = char
        elif char == CAPNEXT:
            if capnext:
                raise CaseOpsError(f"{where}: duplicate capnext marker")
            if not out or word_mode == ALLCAPS:
                raise CaseOpsError(f"{where}: capnext marker at the start of a word or inside an all-caps word")
            capnext = True
        elif char.isupper():
            raise CaseOpsError(f"{where}: capital letter {char!r} (CaseOps text has none outside markers)")
        else:
            upper = capnext or word_mode == ALLCAPS or (word_mode == TITLE and not out)
            out.append(char.upper() if upper else char)
            capnext = False
    if capnext or (word_mode and not out):
        end = start + len(unit)
        if at_end:
            raise CaseOpsError(f"character {end - 1}: dangling capitalization marker at the end of the text")
        raise CaseOpsError(f"character {end - 1}: capitalization marker not followed by an ASCII letter")
    return "".join(out)


def original_byte_counts(surfaces: Iterable[str]) -> list[int]:
    """UTF-8 bytes of the original text behind each piece, from the pieces' surfaces in order.

    A surface is the fragment of the transformed text a piece covers. TITLE, ALLCAPS,
    CAPNEXT and ESC count 0; a character after ESC counts its own UTF-8 length (the escape
    may end one piece and its character start the next); every other character counts its
    UTF-8 length, a letter 1 whatever its case in the original. For one document the counts
    sum to the UTF-8 length of the original text that the pieces cover.
    """
    counts = []
    escaped = False  # the previous character was an ESC, possibly in the previous piece
    for surface in surfaces:
        if not escaped and _ANY_MARKER.search(surface) is None:
            counts.append(len(surface.encode("utf-8")))
            continue
        count = 0
        for char in surface:
            if escaped:
                count += len(char.encode("utf-8"))
                escaped = False
            elif char == ESC:
                escaped = True
            elif char not in CASE_MARKERS:
                count += len(char.encode("utf-8"))
        counts.append(count)
    return counts
