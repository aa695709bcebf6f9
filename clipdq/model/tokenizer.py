"""A byte-level BPE tokenizer for a new text tower, built from the texts it must tell apart (a spec's
value captions): each of their words is one token, and any other text still tokenizes, byte by byte.
"""

from __future__ import annotations

import re

from transformers import CLIPTokenizer

_WORD = re.compile(r"[^\W\d_]+|\d|[^\s\w]+|_")  # CLIP's pre-tokenizer, in stdlib regex terms
MAX_TOKENS = 32  # the text tower's length: enough for any caption


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2/CLIP byte-level alphabet: every byte maps to a printable character."""
    keep = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    chars, extra = {}, 0
    for byte in range(256):
        if byte in keep:
            chars[byte] = chr(byte)
        else:
            chars[byte] = chr(256 + extra)
            extra += 1
    return chars


def _apply_merges(symbols: list[str], ranks: dict[tuple[str, str], int]) -> list[str]:
    """BPE as the tokenizer runs it: repeatedly merge the adjacent pair of lowest rank."""
    while len(symbols) > 1:
        rank, i = min((ranks.get(pair, len(ranks)), i) for i, pair in enumerate(zip(symbols, symbols[1:])))
        if rank == len(ranks):
            break
        symbols = [*symbols[:i], symbols[i] + symbols[i + 1], *symbols[i + 2 :]]
    return symbols


def build_tokenizer(texts: list[str]) -> CLIPTokenizer:
    """A CLIP BPE tokenizer whose merges spell each word of ``texts`` as one token.

    Any other text still tokenizes, byte by byte, so the tokenizer is complete.
    """
    alphabet = _bytes_to_unicode()
    vocab: dict[str, int] = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    for char in alphabet.values():
        vocab.setdefault(char, len(vocab))
        vocab.setdefault(char + "</w>", len(vocab))
    ranks: dict[tuple[str, str], int] = {}
    for word in sorted({w for text in texts for w in _WORD.findall(text.lower())}):
        symbols = [alphabet[b] for b in word.encode()]
        symbols[-1] += "</w>"
        pieces = _apply_merges(symbols, ranks)
        while len(pieces) > 1:  # a new merge ranks last, so it never changes earlier words
            ranks[(pieces[0], pieces[1])] = len(ranks)
            vocab.setdefault(pieces[0] + pieces[1], len(vocab))
            pieces = _apply_merges(pieces, ranks)
    merges = sorted(ranks, key=ranks.__getitem__)
    # transformers annotates merges as strings; the tokenizers BPE it passes them to takes (left, right) pairs
    return CLIPTokenizer(vocab=vocab, merges=merges, model_max_length=MAX_TOKENS)  # type: ignore[arg-type]
