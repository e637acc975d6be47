"""slip's tokenizer as transformers' CLIPTokenizer files, and the check that a transformers directory's vocabulary
is slip's."""
from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path

from slip.checkpoint import CheckpointError

__all__ = ["check_vocabulary", "hf_tokenizer_files"]


def hf_tokenizer_files(out_dir: Path, context_length: int) -> list[Path]:
    """Write slip's tokenizer as transformers' CLIPTokenizer files into `out_dir`.

    vocab.json and merges.txt are built as our tokenizer builds its vocabulary (byte symbols, byte symbols +
    "</w>", the merges joined, then SOT and EOT), plus tokenizer.json, tokenizer_config.json and
    special_tokens_map.json. `CLIPTokenizer.from_pretrained(out_dir)` then gives `slip.tokenizer.tokenize`'s
    ids up to the end token (transformers pads with EOT where we pad with 0).
    """
    from transformers import CLIPTokenizer

    from slip.tokenizer import EOT_TOKEN, SOT_TOKEN, default_merges_path, default_tokenizer, read_merges

    ours = default_tokenizer()
    vocab = {ours.id_to_token(index): index for index in range(ours.vocab_size)}
    merges = read_merges(default_merges_path())
    specials = {"bos_token": SOT_TOKEN, "eos_token": EOT_TOKEN, "unk_token": EOT_TOKEN,
                "pad_token": EOT_TOKEN}
    files = {
        "vocab.json": json.dumps(vocab, ensure_ascii=False),
        "merges.txt": "#version: 0.2\n" + "".join(f"{left} {right}\n" for left, right in merges),
        "special_tokens_map.json": json.dumps(specials, indent=2),
        "tokenizer_config.json": json.dumps({
            "tokenizer_class": "CLIPTokenizer", "model_max_length": context_length, "do_lower_case": True,
            "add_prefix_space": False, "errors": "replace", **specials,
        }, indent=2),
    }
    written = []
    for name, text in files.items():
        (out_dir / name).write_text(text, encoding="utf-8")
        written.append(out_dir / name)
    # tokenizer.json: the same tokenizer in the `tokenizers` library's own format, as hub CLIP repos carry it.
    hf_tokenizer = CLIPTokenizer(vocab=vocab, merges=merges, **specials)
    hf_tokenizer.backend_tokenizer.save(str(out_dir / "tokenizer.json"))
    written.append(out_dir / "tokenizer.json")
    return written



def check_vocabulary(directory: Path) -> None:
    """Raise CheckpointError where the directory's tokenizer (vocab.json) is not slip's CLIP vocabulary, whose
    ids the text tower would then be fed; a directory without one is taken as CLIP's."""
    vocab_path = directory / "vocab.json"
    if not vocab_path.is_file():
        return
    from slip.tokenizer import default_tokenizer

    try:
        theirs = json.loads(vocab_path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError) as error:
        raise CheckpointError(f"{vocab_path}: unreadable vocabulary ({type(error).__name__}: {error})") from None
    ours = default_tokenizer()
    if not isinstance(theirs, Mapping) or len(theirs) != ours.vocab_size:
        size = len(theirs) if isinstance(theirs, Mapping) else type(theirs).__name__
        raise CheckpointError(f"{vocab_path}: not slip's CLIP vocabulary: {size} tokens, slip's tokenizer has "
                              f"{ours.vocab_size}")
    by_id = {index: token for token, index in theirs.items()}
    for index in range(ours.vocab_size):
        if by_id.get(index) != ours.id_to_token(index):
            raise CheckpointError(f"{vocab_path}: not slip's CLIP vocabulary: id {index} is {by_id.get(index)!r}, "
                                  f"slip's tokenizer has {ours.id_to_token(index)!r}")

