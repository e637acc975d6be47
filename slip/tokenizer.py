"""CLIP-compatible byte-level BPE tokenizer.

Produces exactly the token ids of OpenAI CLIP's tokenizer (``clip.tokenize(..., truncate=True)``), from the
merges table shipped in ``slip/assets``. The pipeline for one text is:

1. clean: ``ftfy.fix_text``, HTML-unescape twice, strip, collapse whitespace runs to one space, lower-case;
2. split into pre-tokens with a regex (special tokens, English contractions, letter runs, single digits,
   runs of other non-space characters);
3. spell each pre-token's UTF-8 bytes with 256 printable stand-in characters, mark its last symbol as a word
   end (``</w>``) and apply the ranked BPE merges;
4. look the resulting symbols up in the 49,408-entry vocabulary.

BPE results are memoised per pre-token in a bounded LRU cache, so a training loop that tokenizes every
caption mostly pays for cleaning and the regex split.
"""
from __future__ import annotations

import functools
import gzip
import heapq
import html
import importlib.resources
import io
import os
import re
from collections.abc import Iterable, Sequence
from typing import TYPE_CHECKING, Any, Union

import ftfy
import regex
import torch

if TYPE_CHECKING:
    from importlib.resources.abc import Traversable

__all__ = [
    "DEFAULT_CONTEXT_LENGTH",
    "EOT_TOKEN",
    "NUM_MERGES",
    "SOT_TOKEN",
    "VOCAB_SIZE",
    "Tokenizer",
    "bytes_to_unicode",
    "clean_text",
    "decode",
    "default_merges_path",
    "default_tokenizer",
    "read_merges",
    "tokenize",
]

SOT_TOKEN = "<|startoftext|>"
EOT_TOKEN = "<|endoftext|>"
NUM_MERGES = 48_894  # merges used by CLIP: lines 1..48894 after the header line of the merges file
VOCAB_SIZE = 256 + 256 + NUM_MERGES + 2  # 49,408
DEFAULT_CONTEXT_LENGTH = 77
DEFAULT_WORD_CACHE_SIZE = 1 << 18  # distinct pre-tokens whose ids are kept; an LRU bound, not a leak

_WORD_END = "</w>"
_MERGES_FILENAME = "bpe_simple_vocab_16e6.txt.gz"

# Pre-tokenizer. Alternatives are tried in this order at each position: the two special tokens, the
# contractions 's 't 're 've 'm 'll 'd, a run of letters, ONE digit, a run of anything that is neither
# whitespace, letter nor digit. Whitespace is never part of a pre-token.
_PRETOKEN_RE = regex.compile(
    r"<\|startoftext\|>|<\|endoftext\|>|'(?:s|t|re|ve|m|ll|d)|\p{L}+|\p{N}|[^\s\p{L}\p{N}]+",
    regex.IGNORECASE,
)
# Unicode whitespace as the `regex` module defines it (this is what CLIP's cleaning collapses).
_WHITESPACE_RE = regex.compile(r"\s+")
# Printable ASCII plus tab/newline, without '&'. ftfy leaves such text untouched (nothing to unescape, no
# control or escape characters, no mojibake possible) and HTML-unescaping is a no-op on it, so cleaning can
# skip both; `str.split` then treats exactly tab, newline and space as whitespace, like `\s` does here.
_PLAIN_ASCII_RE = re.compile(r"[\t\n\x20-\x25\x27-\x7e]*")

MergesSource = Union[str, "os.PathLike[str]", "Traversable"]


def bytes_to_unicode() -> dict[int, str]:
    """Map every byte value 0..255 to a distinct printable character (the symbols BPE operates on)."""
    printable = [
        *range(ord("!"), ord("~") + 1),
        *range(ord("\u00a1"), ord("\u00ac") + 1),
        *range(ord("\u00ae"), ord("\u00ff") + 1),
    ]
    mapping = {byte: chr(byte) for byte in printable}
    # Bytes without a printable self-image (controls, space, NBSP, soft hyphen...) take code points from
    # U+0100 upwards, in byte order. Insertion order of the dict is also the vocabulary order.
    next_code_point = 256
    for byte in range(256):
        if byte not in mapping:
            mapping[byte] = chr(next_code_point)
            next_code_point += 1
    return mapping


def clean_text(text: str) -> str:
    """Normalise a text the way CLIP does before tokenizing it (ftfy, HTML unescape, whitespace, lower)."""
    if _PLAIN_ASCII_RE.fullmatch(text):
        return " ".join(text.split()).lower()
    text = ftfy.fix_text(text)
    text = html.unescape(html.unescape(text)).strip()
    return _WHITESPACE_RE.sub(" ", text).strip().lower()


def default_merges_path() -> Traversable:
    """Location of the BPE merges file shipped as package data in ``slip/assets``."""
    return importlib.resources.files("slip") / "assets" / _MERGES_FILENAME


def read_merges(source: MergesSource) -> list[tuple[str, str]]:
    """Read the first `NUM_MERGES` merge rules (after the header line) from a gzipped merges file."""
    if isinstance(source, (str, os.PathLike)):
        raw = gzip.open(source, "rb")
    else:
        raw = gzip.GzipFile(fileobj=io.BytesIO(source.read_bytes()), mode="rb")
    with raw:
        lines = raw.read().decode("utf-8").split("\n")
    rules = lines[1 : 1 + NUM_MERGES]
    if len(rules) != NUM_MERGES:
        raise ValueError(f"merges file {source} has {len(rules)} merge lines, expected {NUM_MERGES}")
    merges = []
    for number, line in enumerate(rules, start=1):
        parts = line.split()
        if len(parts) != 2:
            raise ValueError(f"merges file {source}, line {number}: expected two symbols, got {line!r}")
        merges.append((parts[0], parts[1]))
    return merges


def _check_context_length(context_length: int) -> None:
    """Reject context lengths that cannot hold the start and end tokens."""
    if isinstance(context_length, bool) or not isinstance(context_length, int):
        raise TypeError(f"context_length must be an int, got {context_length!r}")
    if context_length < 2:
        raise ValueError(f"context_length must be >= 2 (start + end token), got {context_length}")


class Tokenizer:
    """CLIP's byte-level BPE tokenizer: text -> token ids and back, id-for-id equal to OpenAI's."""

    def __init__(
        self, merges_path: MergesSource | None = None, word_cache_size: int = DEFAULT_WORD_CACHE_SIZE
    ) -> None:
        """Load the merges (package data by default, never the network) and build the vocabulary."""
        self._merges_path = default_merges_path() if merges_path is None else merges_path
        self._word_cache_size = word_cache_size
        merges = read_merges(self._merges_path)

        byte_map = bytes_to_unicode()
        byte_symbols = list(byte_map.values())
        vocab = byte_symbols + [symbol + _WORD_END for symbol in byte_symbols]
        vocab += [left + right for left, right in merges]
        vocab += [SOT_TOKEN, EOT_TOKEN]
        if len(vocab) != VOCAB_SIZE:  # pragma: no cover - guarded by read_merges
            raise AssertionError(f"vocabulary has {len(vocab)} entries, expected {VOCAB_SIZE}")

        self._id_to_token: list[str] = vocab
        self._token_to_id: dict[str, int] = {token: index for index, token in enumerate(vocab)}
        self._merge_rank: dict[tuple[str, str], int] = {pair: rank for rank, pair in enumerate(merges)}
        # Pre-token -> stand-in symbols in one C call: UTF-8 bytes read as Latin-1 give code points 0..255.
        self._byte_translation = str.maketrans({chr(byte): symbol for byte, symbol in byte_map.items()})
        self._symbol_to_byte: dict[str, int] = {symbol: byte for byte, symbol in byte_map.items()}
        self._sot = self._token_to_id[SOT_TOKEN]
        self._eot = self._token_to_id[EOT_TOKEN]
        self._specials = {SOT_TOKEN: (self._sot,), EOT_TOKEN: (self._eot,)}
        self._init_cache()

    def _init_cache(self) -> None:
        """(Re)create the bounded per-pre-token memo of BPE ids."""
        self._pretoken_ids = functools.lru_cache(maxsize=self._word_cache_size)(self._pretoken_ids_uncached)

    def __getstate__(self) -> dict[str, Any]:
        """Pickle support (DataLoader workers): the memo is dropped and rebuilt empty."""
        state = self.__dict__.copy()
        del state["_pretoken_ids"]
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        """Restore a pickled tokenizer with a fresh, empty memo."""
        self.__dict__.update(state)
        self._init_cache()

    def __repr__(self) -> str:
        """Short description with the merges source."""
        return f"{type(self).__name__}(merges_path={str(self._merges_path)!r}, vocab_size={self.vocab_size})"

    @property
    def sot_token_id(self) -> int:
        """Id of ``<|startoftext|>`` (49406)."""
        return self._sot

    @property
    def eot_token_id(self) -> int:
        """Id of ``<|endoftext|>`` (49407)."""
        return self._eot

    @property
    def vocab_size(self) -> int:
        """Number of tokens in the vocabulary (49408)."""
        return len(self._id_to_token)

    def token_to_id(self, token: str) -> int:
        """Id of a vocabulary entry given in its BPE spelling (e.g. ``'cat</w>'``); KeyError if absent."""
        return self._token_to_id[token]

    def id_to_token(self, token_id: int) -> str:
        """BPE spelling of the vocabulary entry with this id."""
        if not 0 <= token_id < len(self._id_to_token):
            raise IndexError(f"token id {token_id} outside [0, {len(self._id_to_token)})")
        return self._id_to_token[token_id]

    def cache_info(self) -> Any:
        """Hit/miss statistics of the per-pre-token BPE memo (``functools`` CacheInfo)."""
        return self._pretoken_ids.cache_info()

    def _bpe(self, symbols: list[str]) -> list[str]:
        """Apply merges to one word: repeatedly merge, left to right, every occurrence of the best pair.

        Pairs wait in a heap ordered by (rank, position), so a word of n symbols costs O(n log n) instead of
        a full scan per merge (quadratic: minutes for a 100,000-letter "word"). This gives the same result
        as the scan because a merge creates only pairs of higher rank than its own (a merge's parts exist
        before it in the merges table; checked by the tests), so all occurrences of the best pair are merged,
        left to right, before any pair it creates.
        """
        rank_of = self._merge_rank.get
        count = len(symbols)
        following = list(range(1, count)) + [-1]
        preceding = list(range(-1, count - 1))
        word: list[str | None] = list(symbols)
        heap = [(rank, at) for at in range(count - 1)
                if (rank := rank_of((symbols[at], symbols[at + 1]))) is not None]
        heapq.heapify(heap)
        while heap:
            rank, at = heapq.heappop(heap)
            right_at = following[at]
            if word[at] is None or right_at < 0 or rank_of((word[at], word[right_at])) != rank:
                continue  # stale: an earlier merge changed this pair
            word[at] += word[right_at]
            word[right_at] = None
            following[at] = following[right_at]
            if following[at] >= 0:
                preceding[following[at]] = at
            for left, right in ((preceding[at], at), (at, following[at])):
                if left >= 0 and right >= 0 and (new_rank := rank_of((word[left], word[right]))) is not None:
                    heapq.heappush(heap, (new_rank, left))
        return [symbol for symbol in word if symbol is not None]

    def _pretoken_ids_uncached(self, pretoken: str) -> tuple[int, ...]:
        """Token ids of one pre-token (a special token, or a word run through byte mapping and BPE)."""
        special = self._specials.get(pretoken)
        if special is not None:
            return special
        spelled = pretoken.encode("utf-8").decode("latin-1").translate(self._byte_translation)
        symbols = list(spelled)
        symbols[-1] += _WORD_END
        token_id = self._token_to_id
        return tuple(token_id[symbol] for symbol in self._bpe(symbols))

    def _encode_clean(self, cleaned: str, max_tokens: int | None = None) -> list[int]:
        """Ids of already-cleaned text; with `max_tokens`, stop once at least that many are produced."""
        ids: list[int] = []
        pretoken_ids = self._pretoken_ids
        if max_tokens is None:
            for pretoken in _PRETOKEN_RE.findall(cleaned):
                ids.extend(pretoken_ids(pretoken))
        else:
            for match in _PRETOKEN_RE.finditer(cleaned):
                ids.extend(pretoken_ids(match.group()))
                if len(ids) >= max_tokens:
                    break
        return ids

    def encode(self, text: str) -> list[int]:
        """Token ids of `text` after CLIP cleaning, without start/end tokens and without truncation."""
        return self._encode_clean(clean_text(text))

    def decode(self, ids: Iterable[int], skip_special_tokens: bool = True) -> str:
        """Text of a token id sequence (a list, or a 1-D tensor such as one row of `tokenize`'s output).

        Zeros after the last end token are padding and are dropped (id 0 is ``!`` elsewhere). With
        `skip_special_tokens`, start/end tokens are dropped too. Every word end becomes a space and trailing
        spaces are removed, so ``decode(tokenize(text)[0])`` gives the cleaned text back, except that
        pre-tokens written together (``"cat,"``) come back space-separated (``"cat ,"``). Byte sequences
        that are not valid UTF-8 (possible in a truncated row) decode to U+FFFD.
        """
        if isinstance(ids, torch.Tensor):
            if ids.dim() != 1:
                raise ValueError(f"decode takes a 1-D sequence of ids, got a tensor of shape {tuple(ids.shape)}")
            ids = ids.tolist()
        id_list = [int(token_id) for token_id in ids]
        vocab = self._id_to_token
        for token_id in id_list:
            if not 0 <= token_id < len(vocab):
                raise ValueError(f"token id {token_id} outside the vocabulary [0, {len(vocab)})")

        end = len(id_list)
        while end > 0 and id_list[end - 1] == 0:
            end -= 1
        if end > 0 and id_list[end - 1] == self._eot:
            id_list = id_list[:end]
        if skip_special_tokens:
            id_list = [token_id for token_id in id_list if token_id != self._sot and token_id != self._eot]

        spelled = "".join(vocab[token_id] for token_id in id_list)
        byte_of = self._symbol_to_byte
        text = bytes(byte_of[symbol] for symbol in spelled).decode("utf-8", errors="replace")
        return text.replace(_WORD_END, " ").rstrip(" ")

    def __call__(self, texts: str | Sequence[str], context_length: int = DEFAULT_CONTEXT_LENGTH) -> torch.Tensor:
        """Token id matrix (N, context_length), int64: start, ids, end, zero padding; long texts truncated.

        A text with more than ``context_length - 2`` tokens keeps its first ``context_length - 2`` and still
        ends with the end token, as ``clip.tokenize(..., truncate=True)`` does. A single string gives (1, L).
        """
        _check_context_length(context_length)
        if isinstance(texts, str):
            texts = [texts]
        body = context_length - 2
        sot, eot = self._sot, self._eot
        rows = []
        for index, text in enumerate(texts):
            if not isinstance(text, str):
                raise TypeError(f"texts[{index}] is {type(text).__name__}, expected str")
            ids = self._encode_clean(clean_text(text), max_tokens=body + 1)
            del ids[body:]
            row = [sot, *ids, eot]
            row.extend([0] * (context_length - len(row)))
            rows.append(row)
        if not rows:
            return torch.zeros((0, context_length), dtype=torch.long)
        return torch.tensor(rows, dtype=torch.long)


@functools.lru_cache(maxsize=1)
def default_tokenizer() -> Tokenizer:
    """The shared tokenizer over the packaged merges, created on first use."""
    return Tokenizer()


def tokenize(texts: str | Sequence[str], context_length: int = DEFAULT_CONTEXT_LENGTH) -> torch.Tensor:
    """Tokenize with the default tokenizer: int64 (N, context_length), equal to ``clip.tokenize(truncate=True)``."""
    return default_tokenizer()(texts, context_length)


def decode(ids: Iterable[int], skip_special_tokens: bool = True) -> str:
    """Decode ids with the default tokenizer (see `Tokenizer.decode`)."""
    return default_tokenizer().decode(ids, skip_special_tokens=skip_special_tokens)
