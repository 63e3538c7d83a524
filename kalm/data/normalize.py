"""Text normalisation: Unicode NFC, control characters out, whitespace collapsed; and the comparison form
(NFKC, case-folded) that exact/near dedup and decontamination compare.

Example::

    normalize_text("  Cafe\u0301\x07  au\tlait ")  # 'Café au lait'
"""

from __future__ import annotations

import re
import unicodedata

# C0/C1 controls except tab/newline/CR, plus zero-width and BOM characters that survive NFC.
_CONTROL = re.compile("[\x00-\x08\x0b\x0c\x0e-\x1f\x7f-\x9f\u200b-\u200d\u2060\ufeff]")
_WS = re.compile(r"\s+")
_SPACES = re.compile(r"[^\S\n]+")
_NEWLINES = re.compile(r"\s*\n\s*")


def normalize_text(text: str, keep_newlines: bool = False) -> str:
    """NFC, drop control characters, collapse whitespace (single newlines kept if asked), strip."""
    if not text.isascii():
        text = unicodedata.normalize("NFC", text)
    text = _CONTROL.sub("", text)
    if keep_newlines:
        return _NEWLINES.sub("\n", _SPACES.sub(" ", text)).strip()
    return _WS.sub(" ", text).strip()


def comparison_form(text: str) -> str:
    """What dedup and decontamination compare: NFKC, case-folded, controls dropped, whitespace collapsed.

    ``comparison_form("The  CAT\u00a0sat") == comparison_form("the cat sat")``
    """
    text = _CONTROL.sub("", unicodedata.normalize("NFKC", text)).casefold()
    return _WS.sub(" ", text).strip()


def has_invalid_unicode(text: str) -> bool:
    """True for lone surrogates, which is how undecodable bytes arrive with ``surrogateescape``."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return True
    return False
