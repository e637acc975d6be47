"""Tests for slip.tokenizer: id-for-id equality with OpenAI CLIP's tokenizer, decoding, errors, packaging."""
from __future__ import annotations

import gzip
import pickle
import random
import signal
import socket
from pathlib import Path

import pytest
import torch

from slip import tokenizer as tok_module
from slip.tokenizer import Tokenizer, decode, default_merges_path, default_tokenizer, tokenize

CONTEXT_LENGTHS = (5, 16, 32, 77)
TRICKY_CONTEXT_LENGTHS = (2, 3, *CONTEXT_LENGTHS)

# Inputs chosen to hit each step of the pipeline: ftfy, HTML unescaping, whitespace, lower-casing, every
# branch of the pre-tokenizer regex, multi-byte UTF-8 and BPE, truncation.
TRICKY_TEXTS = [
    "",
    " ",
    "   \t\n  ",
    "\u00a0\u3000\u2028\u2029\x0b\x0c\r\n",
    "a",
    "A",
    "a photo of a cat",
    "A PHOTO OF A DOG, sitting on a couch.",
    "  leading and trailing   spaces  ",
    "tabs\tand\nnewlines\r\nand\r\rcarriage\x0breturns\x0cfeeds",
    "multiple     spaces\t\t\tbetween\n\n\nwords",
    "It's a dog's life, isn't it? We're sure they've been, I'm sure you'll say he'd agree.",
    "IT'S SHOUTING 'S 'T 'RE 'VE 'M 'LL 'D",
    "'s's't're've'm'll'd'x",
    "don\u2019t curly \u2018quotes\u2019 and \u201cdouble\u201d",
    "Caf\u00e9 na\u00efve r\u00e9sum\u00e9 \u00fcber co\u00f6perate \u00c5ngstr\u00f6m",
    "cafe\u0301 (combining accent) e\u0300\u0301\u0302",
    "\u65e5\u672c\u8a9e\u306e\u30c6\u30ad\u30b9\u30c8 \u4e2d\u6587\u6587\u672c \ud55c\uad6d\uc5b4",
    "\u041f\u0440\u0438\u0432\u0435\u0442 \u043c\u0438\u0440 \u0395\u03bb\u03bb\u03b7\u03bd\u03b9\u03ba\u03ac",
    "\u0645\u0631\u062d\u0628\u0627 \u05e9\u05dc\u05d5\u05dd \u0928\u092e\u0938\u094d\u0924\u0947 \u0e2a\u0e27\u0e31\u0e2a\u0e14\u0e35",
    "emoji \U0001F600\U0001F602\U0001F44D\U0001F3FD \U0001F468\u200D\U0001F469\u200D\U0001F467 \U0001F1FA\U0001F1F8",
    "\u2764\ufe0f\U0001F525\U0001F525\U0001F525 fire",
    "Tom &amp; Jerry &lt;3 &gt; &quot;quoted&quot; it&#39;s &#x27;hex&#x27; &nbsp;space",
    "double escaped &amp;amp; &amp;lt;b&amp;gt; triple &amp;amp;amp;",
    "&hellip; &copy; &eacute;t&eacute; &unknownentity; & alone &",
    "<b>bold</b> & <i>tags</i> &amp; stay",
    "mojibake: \u00e2\u0153\u201d No problems, \u00c3\u00a9t\u00c3\u00a9, caf\u00c3\u00a9, don\u00e2\u20ac\u2122t",
    "\u00ef\u00bb\u00bfBOM-ish and \u00c3\u00bc\u00c3\u00b6",
    "\uff2c\uff2f\uff35\uff24 \uff2e\uff2f\uff29\uff33\uff25\uff33 fullwidth",
    "\ufb02ubberi\ufb01c ligatures",
    "!!!???... ,,, ;;; ::: --- ___ *** ### @@@ $$$ %%% ^^^ ~~~ ``` ||| \\\\ //",
    "punct!runs?!?!...inside,words;and:more",
    "(parentheses) [brackets] {braces} <angles>",
    "numbers 0 12 345 6789 3.14159 1,000,000 -42 +7 1e10 2nd 3rd 4th",
    "\u0661\u0662\u0663 \u0967\u0968\u0969 \u2160\u2161\u2162 \u00bd\u00bc \u2460\u2461 superscript\u00b2",
    "price: $19.99 (20% off!) #sale @store http://example.com/a?b=c&d=e",
    "email: someone@example.org, path C:\\Users\\x\\file.txt",
    "<|startoftext|>",
    "<|endoftext|>",
    "text <|endoftext|> more text <|startoftext|> again",
    "<|EndOfText|> mixed case <|STARTOFTEXT|>",
    "!<|endoftext|> glued<|endoftext|>x",
    "control\x00chars\x01\x07\x1b[31mred\x1b[0m\x7f\x85end",
    "zero\u200bwidth\u200c\u200djoiners\ufeff",
    "lone surrogate a\ud800b and pair \ud83d\ude00",
    "\u0130stanbul \u01c5 stra\u00dfe \u1e9e \u03a3\u03c3\u03c2",
    "\U0001D400\U0001D401 math bold \u2115\u211d",
    "ta\u0308bles with diaeresis and  \u0301 stray combining",
    "supercalifragilisticexpialidocious pneumonoultramicroscopicsilicovolcanoconiosis",
    "a" * 300,
    "!" * 300,
    "\U0001F600" * 50,
    "word " * 200,
    "The quick brown fox jumps over the lazy dog. " * 20,
    "\u65e5\u672c" * 100,
    " ".join(str(i) for i in range(200)),
]


def _reference(openai_clip, texts: list[str], context_length: int) -> torch.Tensor:
    """OpenAI's tokenize with truncation, as int64."""
    return openai_clip.tokenize(texts, context_length=context_length, truncate=True).long()


@pytest.fixture(scope="module")
def ref_tokenizer(openai_clip):
    """OpenAI's SimpleTokenizer (reference for encode/decode)."""
    return openai_clip.simple_tokenizer.SimpleTokenizer()


@pytest.fixture(scope="module")
def tok() -> Tokenizer:
    """The default tokenizer."""
    return default_tokenizer()


# ---------------------------------------------------------------------------------------------------------
# randomized inputs


_ENTITIES = ["&amp;", "&lt;", "&gt;", "&quot;", "&#39;", "&#x27;", "&nbsp;", "&amp;amp;", "&hellip;", "&eacute;",
             "&copy;", "&#8217;", "&#128512;", "&bogus;", "&", "&#", "&amp;lt;"]
_MOJIBAKE = ["\u00c3\u00a9", "\u00e2\u20ac\u2122", "\u00e2\u20ac\u0153", "\u00c3\u00bc", "\u00c3\u00a0",
             "\u00e2\u0153\u201d", "\u00c2\u00a0", "\u00c3\u00b1"]
_SPECIALS = ["<|endoftext|>", "<|startoftext|>", "<|EndOfText|>", "<|", "|>"]
_WHITESPACE = [" ", "  ", "\t", "\n", "\r\n", "\u00a0", "\u3000", "\u2028", "\x0b", "\x0c", "\x85", "\u200b"]
_EMOJI = ["\U0001F600", "\U0001F44D\U0001F3FD", "\U0001F468\u200D\U0001F469\u200D\U0001F467",
          "\U0001F1EF\U0001F1F5", "\u2764\ufe0f", "\U0001F525", "\U0001F9D1\u200D\U0001F4BB", "\u2603"]
_CONTRACTIONS = ["'s", "'t", "'re", "'ve", "'m", "'ll", "'d", "'S", "'LL", "n't", "'x"]
_BLOCKS = [  # (first, last) code points
    (0x00C0, 0x024F),  # Latin-1 letters, Latin Extended A/B
    (0x0300, 0x036F),  # combining marks
    (0x0370, 0x03FF),  # Greek
    (0x0400, 0x04FF),  # Cyrillic
    (0x0590, 0x06FF),  # Hebrew, Arabic
    (0x0900, 0x097F),  # Devanagari
    (0x0E00, 0x0E7F),  # Thai
    (0x2000, 0x206F),  # general punctuation
    (0x2100, 0x22FF),  # letterlike, number forms, arrows, math
    (0x3040, 0x30FF),  # kana
    (0x4E00, 0x9FFF),  # CJK
    (0xAC00, 0xD7A3),  # Hangul
    (0xFF00, 0xFFEF),  # fullwidth forms
    (0x1D400, 0x1D7FF),  # math alphanumerics
    (0x1F300, 0x1FAFF),  # emoji and pictographs
    (0x0080, 0x00BF),  # C1 controls, Latin-1 punctuation
    (0x0000, 0x001F),  # C0 controls
]
_ASCII_PUNCT = "!\"#$%&'()*+,-./:;<=>?@[\\]^_`{|}~"


def _random_piece(rng: random.Random) -> str:
    """One random fragment of a test string."""
    kind = rng.choices(
        ["word", "Word", "number", "punct", "space", "block", "emoji", "entity", "mojibake", "special",
         "contraction"],
        weights=[30, 8, 6, 8, 14, 12, 5, 5, 4, 2, 4],
    )[0]
    if kind == "word":
        return "".join(rng.choice("abcdefghijklmnopqrstuvwxyz") for _ in range(rng.randint(1, 12)))
    if kind == "Word":
        return "".join(rng.choice("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz")
                       for _ in range(rng.randint(1, 15)))
    if kind == "number":
        return str(rng.randint(0, 10 ** rng.randint(1, 8)))
    if kind == "punct":
        return "".join(rng.choice(_ASCII_PUNCT) for _ in range(rng.randint(1, 6)))
    if kind == "space":
        return "".join(rng.choice(_WHITESPACE) for _ in range(rng.randint(1, 3)))
    if kind == "block":
        first, last = rng.choice(_BLOCKS)
        return "".join(chr(rng.randint(first, last)) for _ in range(rng.randint(1, 6)))
    if kind == "emoji":
        return rng.choice(_EMOJI)
    if kind == "entity":
        return rng.choice(_ENTITIES)
    if kind == "mojibake":
        return rng.choice(_MOJIBAKE)
    if kind == "special":
        return rng.choice(_SPECIALS)
    return rng.choice(_CONTRACTIONS)


def _random_texts(count: int, seed: int) -> list[str]:
    """`count` random strings; lengths range from empty to well past 77 tokens."""
    rng = random.Random(seed)
    texts = []
    for _ in range(count):
        pieces = rng.choice([rng.randint(0, 3), rng.randint(0, 20), rng.randint(0, 20), rng.randint(25, 60)])
        texts.append("".join(_random_piece(rng) for _ in range(pieces)))
    return texts


FUZZ_COUNT = 2000
FUZZ_TEXTS = _random_texts(FUZZ_COUNT, seed=1234)


# ---------------------------------------------------------------------------------------------------------
# equality with the reference


@pytest.mark.parametrize("text", TRICKY_TEXTS, ids=[f"tricky{i}" for i in range(len(TRICKY_TEXTS))])
def test_tricky_text_matches_reference(openai_clip, text):
    for context_length in TRICKY_CONTEXT_LENGTHS:
        ours = tokenize(text, context_length)
        assert ours.dtype == torch.long
        assert ours.shape == (1, context_length)
        assert torch.equal(ours, _reference(openai_clip, [text], context_length)), context_length


def test_tricky_batch_matches_reference(openai_clip, tok):
    """Whole batch at once, also through a Tokenizer instance's __call__."""
    ours = tok(TRICKY_TEXTS)
    assert ours.shape == (len(TRICKY_TEXTS), 77)
    assert torch.equal(ours, _reference(openai_clip, TRICKY_TEXTS, 77))


@pytest.fixture(scope="module")
def ref_encodings(ref_tokenizer) -> dict[str, list[int]]:
    """Reference ids (no start/end, untruncated) of every hand-picked and fuzzed text, computed once."""
    return {text: ref_tokenizer.encode(text) for text in TRICKY_TEXTS + FUZZ_TEXTS}


def test_encode_matches_reference(tok, ref_encodings):
    """Untruncated ids, no start/end tokens."""
    for text, expected in ref_encodings.items():
        assert tok.encode(text) == expected, repr(text)


@pytest.mark.parametrize("context_length", CONTEXT_LENGTHS)
def test_fuzz_matches_reference(openai_clip, context_length):
    ours = tokenize(FUZZ_TEXTS, context_length)
    ref = _reference(openai_clip, FUZZ_TEXTS, context_length)
    assert ours.shape == ref.shape == (FUZZ_COUNT, context_length)
    mismatched = [i for i in range(FUZZ_COUNT) if not torch.equal(ours[i], ref[i])]
    assert not mismatched, f"{len(mismatched)} rows differ, first: {FUZZ_TEXTS[mismatched[0]]!r}"


def test_fuzz_exercises_truncation_and_padding(ref_encodings):
    """Guard on the generator itself: it must produce both short (padded) and over-long (truncated) rows."""
    lengths = [len(ref_encodings[text]) for text in FUZZ_TEXTS]
    assert sum(n == 0 for n in lengths) >= 20
    assert sum(n <= 3 for n in lengths) >= 100
    assert sum(n > 75 for n in lengths) >= 200


def test_truncation_keeps_prefix_and_ends_with_eot(tok, ref_tokenizer):
    text = "one two three " * 40
    ids = ref_tokenizer.encode(text)
    row = tokenize(text, 16)[0].tolist()
    assert row == [tok.sot_token_id, *ids[:14], tok.eot_token_id]


def test_empty_batch(openai_clip):
    assert torch.equal(tokenize([], 16), _reference(openai_clip, [], 16))
    assert tokenize([], 16).shape == (0, 16)


def test_vocab_and_special_ids(tok, ref_tokenizer):
    assert tok.vocab_size == 49408
    assert tok.sot_token_id == 49406
    assert tok.eot_token_id == 49407
    assert tok.id_to_token(49406) == "<|startoftext|>"
    assert tok.id_to_token(49407) == "<|endoftext|>"
    ours = {tok.id_to_token(i): i for i in range(tok.vocab_size)}
    assert len(ours) == tok.vocab_size  # no duplicate spellings
    assert ours == ref_tokenizer.encoder
    assert all(tok.token_to_id(token) == index for token, index in ref_tokenizer.encoder.items())


def test_bytes_to_unicode_matches_reference(openai_clip):
    assert tok_module.bytes_to_unicode() == openai_clip.simple_tokenizer.bytes_to_unicode()
    assert list(tok_module.bytes_to_unicode()) == list(openai_clip.simple_tokenizer.bytes_to_unicode())


# ---------------------------------------------------------------------------------------------------------
# decode


def test_decode_matches_reference_on_encode(tok, ref_tokenizer, ref_encodings):
    """Same ids -> same text as SimpleTokenizer.decode, apart from the trailing word-end space we drop."""
    for text, ids in ref_encodings.items():
        assert tok.decode(ids, skip_special_tokens=False) == ref_tokenizer.decode(ids).rstrip(" "), repr(text)


def test_decode_of_tokenize_row(tok, ref_tokenizer, ref_encodings):
    """decode(tokenize(x)[0]) drops start/end/padding and equals the reference decode of the kept ids."""
    context_length = 16  # a mix of padded and truncated rows; truncation may split a UTF-8 sequence
    specials = {tok.sot_token_id, tok.eot_token_id}
    rows = tokenize(list(ref_encodings), context_length)
    for (text, ids), row in zip(ref_encodings.items(), rows):
        kept = [i for i in ids[: context_length - 2] if i not in specials]
        assert decode(row) == ref_tokenizer.decode(kept).rstrip(" "), repr(text)


def test_decode_keeps_specials_on_request(tok, ref_tokenizer):
    row = tokenize("Hello World", 16)[0]
    unpadded = [i for i in row.tolist() if i != 0]
    assert tok.decode(row, skip_special_tokens=False) == ref_tokenizer.decode(unpadded)
    assert tok.decode(row, skip_special_tokens=False) == "<|startoftext|>hello world <|endoftext|>"


@pytest.mark.parametrize(
    ("text", "cleaned"),
    [
        ("  A  Photo of\tthe CAT\n", "a photo of the cat"),
        ("Caf\u00e9 SOCI\u00c9T\u00c9 &amp; friends", "caf\u00e9 soci\u00e9t\u00e9 & friends"),
        ("\u65e5\u672c\u8a9e \U0001F600", "\u65e5\u672c\u8a9e \U0001F600"),
        ("", ""),
        (" \t\n ", ""),
    ],
)
def test_decode_round_trip_gives_cleaned_text(text, cleaned):
    assert tok_module.clean_text(text) == cleaned
    assert decode(tokenize(text)[0]) == cleaned


def test_decode_padding_rule(tok):
    """Zeros are padding only after the last end token; elsewhere id 0 is the byte '!'."""
    assert tok.id_to_token(0) == "!"
    hello = tok.encode("hello")
    assert tok.decode([tok.sot_token_id, *hello, tok.eot_token_id, 0, 0, 0]) == "hello"
    assert tok.decode([*hello, 0, 0]) == "hello !!"
    assert tok.decode(torch.tensor([tok.sot_token_id, *hello, tok.eot_token_id, 0])) == "hello"


def test_decode_rejects_bad_ids(tok):
    with pytest.raises(ValueError, match="49408"):
        tok.decode([1, 49408])
    with pytest.raises(ValueError, match="-1"):
        tok.decode([-1])
    with pytest.raises(ValueError, match="1-D"):
        tok.decode(tokenize(["a", "b"]))


# ---------------------------------------------------------------------------------------------------------
# errors, caching, packaging


@pytest.mark.parametrize("context_length", [1, 0, -5])
def test_context_length_too_small(context_length):
    with pytest.raises(ValueError, match=rf"context_length.*{context_length}"):
        tokenize("a cat", context_length)


def test_context_length_not_int():
    with pytest.raises(TypeError, match="context_length"):
        tokenize("a cat", 7.5)  # type: ignore[arg-type]


def test_non_string_text_rejected():
    with pytest.raises(TypeError, match=r"texts\[1\]"):
        tokenize(["ok", 3])  # type: ignore[list-item]


def test_default_tokenizer_is_shared():
    assert default_tokenizer() is default_tokenizer()
    assert default_tokenizer.cache_info().maxsize == 1


def test_word_cache_is_bounded(ref_tokenizer):
    small = Tokenizer(word_cache_size=8)
    texts = [f"word{i} caption number {i}" for i in range(50)] + FUZZ_TEXTS[:200]
    for text in texts:
        assert small.encode(text) == ref_tokenizer.encode(text)
    info = small.cache_info()
    assert info.maxsize == 8
    assert info.currsize <= 8
    assert default_tokenizer().cache_info().maxsize is not None


def test_pickle_round_trip(tok, openai_clip):
    """Tokenizers travel to DataLoader workers by pickle."""
    clone = pickle.loads(pickle.dumps(tok))
    assert clone.cache_info().currsize == 0
    assert torch.equal(clone(TRICKY_TEXTS, 32), _reference(openai_clip, TRICKY_TEXTS, 32))


def test_merges_come_from_package_data(monkeypatch):
    """The merges file is read from slip/assets with the network unavailable."""
    def no_network(*args, **kwargs):
        raise AssertionError("the tokenizer tried to use the network")

    monkeypatch.setattr(socket.socket, "connect", no_network)
    monkeypatch.setattr(socket, "create_connection", no_network)

    path = default_merges_path()
    package_dir = Path(tok_module.__file__).resolve().parent
    assert Path(str(path)).resolve() == package_dir / "assets" / "bpe_simple_vocab_16e6.txt.gz"
    assert path.is_file()

    fresh = Tokenizer()
    from_path = Tokenizer(merges_path=str(path))
    assert fresh.vocab_size == from_path.vocab_size == 49408
    assert fresh.encode("a photo of a cat") == from_path.encode("a photo of a cat")


def test_missing_merges_file(tmp_path):
    with pytest.raises(FileNotFoundError):
        Tokenizer(merges_path=tmp_path / "missing.txt.gz")


def test_short_merges_file(tmp_path):
    short = tmp_path / "short.txt.gz"
    with gzip.open(short, "wt", encoding="utf-8") as handle:
        handle.write("#version: 0.2\ni n\nt h\n")
    with pytest.raises(ValueError, match="48894"):
        Tokenizer(merges_path=short)


def _scan_bpe(rank_of, symbols: list[str]) -> list[str]:
    """The textbook BPE loop: find the lowest-rank adjacent pair, merge all its occurrences left to right."""
    while len(symbols) > 1:
        ranked = [(rank_of.get(pair), at) for at, pair in enumerate(zip(symbols, symbols[1:]))]
        ranked = [(rank, at) for rank, at in ranked if rank is not None]
        if not ranked:
            break
        left, right = symbols[min(ranked)[1]], symbols[min(ranked)[1] + 1]
        merged, at = [], 0
        while at < len(symbols):
            if at + 1 < len(symbols) and (symbols[at], symbols[at + 1]) == (left, right):
                merged.append(left + right)
                at += 2
            else:
                merged.append(symbols[at])
                at += 1
        symbols = merged
    return symbols


def test_every_merge_only_uses_tokens_made_by_earlier_merges(tok):
    # The heap-ordered BPE equals the scan only if a merge never creates a pair of lower rank than its own.
    made = {symbol for symbol in (tok.id_to_token(i) for i in range(512))}
    for rank, (left, right) in enumerate(sorted(tok._merge_rank, key=tok._merge_rank.get)):
        assert left in made and right in made, rank
        made.add(left + right)


@pytest.mark.parametrize("seed", range(4))
def test_long_words_match_the_plain_bpe_loop(tok, seed):
    rng = random.Random(seed)
    alphabet = ["a", "b", "e", "n", "s", "t", "th", "an", "ing", "é", "ß", "日", "🙂"][: 4 + 3 * seed]
    word = "".join(rng.choice(alphabet) for _ in range(400 + 300 * seed))
    spelled = list(word.encode("utf-8").decode("latin-1").translate(tok._byte_translation))
    spelled[-1] += "</w>"
    assert tok._bpe(list(spelled)) == _scan_bpe(tok._merge_rank, list(spelled))


def test_a_huge_single_word_caption_is_tokenized_without_stalling():
    # The old per-merge scan took over a minute here; the heap takes well under a second. The generous
    # limit only detects a hang (a DataLoader worker stuck on one caption), it is not a benchmark: SIGALRM
    # interrupts the tokenizer's Python loop after 60 s, as the subprocess's timeout used to end it.
    def hung(signum, frame):
        raise TimeoutError("tokenizing one huge caption took over 60 s")

    previous = signal.signal(signal.SIGALRM, hung)
    signal.setitimer(signal.ITIMER_REAL, 60)
    try:
        tokens = tokenize(["x" + "ab" * 50000 + "q"])
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)
    assert str(tokens[0, :3].tolist()).startswith("[49406, ")
