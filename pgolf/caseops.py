"""CaseOps: a lossless case transform applied before tokenizing (record 2026-04-18, `lossless_caps_caseops_v1`).

Runs of ASCII letters are lowercased and their case is written as operator characters (private-use code
points): TITLE before a Titlecase word, ALLCAPS before an ALLCAPS word of two or more letters, and for
mixed case TITLE (if the first letter is upper) plus CAPNEXT before each later upper letter. A literal
operator character in the text is escaped with ESC. decode(encode(text)) == text for every string, so a
tokenizer can share lowercase pieces across case variants while bpb is still counted on the original
bytes: operators count 0 bytes, every other character its UTF-8 length (ASCII case does not change it).
"""

import re

import numpy as np

TITLE, ALLCAPS, CAPNEXT, ESC = "\ue001", "\ue002", "\ue003", "\ue004"
OPERATORS = (TITLE, ALLCAPS, CAPNEXT, ESC)
_TOKEN = re.compile(r"[A-Za-z]+|[\ue001-\ue004]")


def _encode_word(m: re.Match) -> str:
    w = m.group()
    if w in OPERATORS:
        return ESC + w
    if w.islower():
        return w
    lower = w.lower()
    if len(w) >= 2 and w.isupper():
        return ALLCAPS + lower
    if w[0].isupper() and w[1:].islower():
        return TITLE + lower
    out = [TITLE if w[0].isupper() else "", lower[0]]
    out += [(CAPNEXT + lo) if ch.isupper() else lo for ch, lo in zip(w[1:], lower[1:])]
    return "".join(out)


def encode(text: str) -> str:
    return _TOKEN.sub(_encode_word, text)


def decode(text: str) -> str:
    out, i, n = [], 0, len(text)
    mode, capnext = "", False  # mode: the pending/active word mode ("title", "allcaps", "")
    in_word = False
    while i < n:
        ch = text[i]
        if ch == ESC and i + 1 < n:
            out.append(text[i + 1])
            in_word, mode = False, ""
            i += 2
            continue
        if ch == TITLE:
            mode = "title"
        elif ch == ALLCAPS:
            mode = "allcaps"
        elif ch == CAPNEXT:
            capnext = True
        elif "a" <= ch <= "z":
            start = not in_word
            upper = capnext or mode == "allcaps" or (start and mode == "title")
            out.append(ch.upper() if upper else ch)
            if start and mode == "title":
                mode = ""
            capnext, in_word = False, True
        else:
            out.append(ch)
            in_word, mode, capnext = False, "", False
        i += 1
    return "".join(out)


def original_bytes(text: str) -> np.ndarray:
    """Per character of transformed text, the bytes it stands for in the original: operators 0, an escaped
    literal its own UTF-8 length, everything else its UTF-8 length."""
    cp = np.frombuffer(text.encode("utf-32-le"), dtype=np.uint32)
    nbytes = 1 + (cp >= 0x80).astype(np.int64) + (cp >= 0x800) + (cp >= 0x10000)
    ops = np.flatnonzero((cp >= 0xE001) & (cp <= 0xE004))
    escaped = set()
    for i in ops:
        if i in escaped:
            continue
        nbytes[i] = 0
        if cp[i] == 0xE004 and i + 1 < cp.size:
            escaped.add(i + 1)
    return nbytes


def token_bytes(text: str, offsets: list[tuple[int, int]]) -> np.ndarray:
    """Original bytes per token, from the tokens' character spans in the transformed text."""
    prefix = np.concatenate([[0], np.cumsum(original_bytes(text))])
    spans = np.asarray(offsets, dtype=np.int64).reshape(-1, 2)
    return prefix[spans[:, 1]] - prefix[spans[:, 0]]
