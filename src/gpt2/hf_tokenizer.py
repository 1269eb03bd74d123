"""GPT-2's tokenizer files for a model folder (`gpt2.export.save_model_folder`), so
`transformers.AutoTokenizer.from_pretrained(folder)` and `pipeline("text-generation", model=folder)` work on it
with no hub access.

Design decisions:
- tiktoken's "gpt2" encoding is built from OpenAI's two original files, `encoder.json` and `vocab.bpe`, which
  *are* Hugging Face's `vocab.json` and `merges.txt` (same token strings in GPT-2's byte-to-unicode alphabet,
  same merge order). They are read through `tiktoken.load.read_file_cached`, tiktoken's own download-or-cache
  path with its sha256 check, so offline they come from TIKTOKEN_CACHE_DIR and online from OpenAI's blob store,
  and the copies are byte-identical to the originals. Re-deriving them from tiktoken's `_mergeable_ranks`
  would gain nothing: tiktoken cannot build that table without these very files.
- `tokenizer.json` (the fast tokenizer) is written as JSON directly, not through the `tokenizers` library,
  which is not a dependency of this package: a byte-level BPE model with GPT-2's pre-tokenizer, decoder and
  `<|endoftext|>` as the one special token; tested against tiktoken's ids on real text.
- When the files cannot be had (offline without a cache), the weights are still saved: `save_tokenizer_files`
  prints one warning line and the folder lacks only the tokenizer files. `generation_config.json` needs no
  download and is always written.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

from tiktoken.load import read_file_cached

from gpt2.io import write_bytes_atomic

EOT_TEXT = "<|endoftext|>"
EOT_ID = 50256
_BLOB = "https://openaipublic.blob.core.windows.net/gpt-2/encodings/main/"
# Hugging Face name -> (OpenAI's file, its sha256 as tiktoken checks it)
SOURCES = {
    "vocab.json": (_BLOB + "encoder.json", "196139668be63f3b5d6574427317ae82f612a97c5d1cdaf36ed2256dbf636783"),
    "merges.txt": (_BLOB + "vocab.bpe", "1ce1664773c50f3e0cc8842619a93edc4624525b728b188a9e0be33b7726adc5"),
}
TOKENIZER_FILES = ("vocab.json", "merges.txt", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")


def read_gpt2_files() -> dict[str, bytes]:
    """{"vocab.json": ..., "merges.txt": ...}: tiktoken's cached copies, or downloaded (hash-checked)."""
    return {name: read_file_cached(url, expected_hash=sha) for name, (url, sha) in SOURCES.items()}


def merge_rules(merges_txt: bytes) -> list[str]:
    """The merges in rank order as "left right" strings (the file's "#version" header and blank lines dropped)."""
    lines = merges_txt.decode("utf-8").split("\n")
    return [line for line in lines if line and not line.startswith("#version")]


def tokenizer_json(vocab: dict[str, int], merges: list[str]) -> dict:
    """The `tokenizers` library's serialisation of GPT-2's byte-level BPE."""
    byte_level = {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": True}
    return {
        "version": "1.0",
        "truncation": None,
        "padding": None,
        "added_tokens": [{"id": EOT_ID, "content": EOT_TEXT, "single_word": False, "lstrip": False,
                          "rstrip": False, "normalized": True, "special": True}],
        "normalizer": None,
        "pre_tokenizer": byte_level,
        "post_processor": {**byte_level, "trim_offsets": False},
        "decoder": byte_level,
        "model": {"type": "BPE", "dropout": None, "unk_token": None, "continuing_subword_prefix": "",
                  "end_of_word_suffix": "", "fuse_unk": False, "byte_fallback": False, "ignore_merges": False,
                  "vocab": vocab, "merges": merges},
    }


def tokenizer_config(model_max_length: int) -> dict:
    return {"tokenizer_class": "GPT2Tokenizer", "model_max_length": model_max_length, "bos_token": EOT_TEXT,
            "eos_token": EOT_TEXT, "unk_token": EOT_TEXT, "add_prefix_space": False, "add_bos_token": False,
            "clean_up_tokenization_spaces": False, "errors": "replace"}


def generation_config() -> dict:
    # pad = eos: GPT-2 has no pad token, and generate() would otherwise warn and pick it on every call
    return {"bos_token_id": EOT_ID, "eos_token_id": EOT_ID, "pad_token_id": EOT_ID}


def save_tokenizer_files(directory: str | os.PathLike, model_max_length: int) -> bool:
    """Write the tokenizer files and generation_config.json into `directory` (atomically, file by file).
    Returns False, after one warning line on stderr, when GPT-2's BPE files are unavailable."""
    out = Path(directory)
    write_bytes_atomic(out / "generation_config.json", json.dumps(generation_config(), indent=2).encode())
    try:
        files = read_gpt2_files()
    except Exception as e:  # offline without a cache: network errors come in many types
        print(f"warning: tokenizer files not written to {out} (GPT-2's BPE files are unavailable: "
              f"{type(e).__name__}; set TIKTOKEN_CACHE_DIR); the weights were saved", file=sys.stderr)
        return False
    vocab = json.loads(files["vocab.json"])
    contents = {
        "vocab.json": files["vocab.json"],
        "merges.txt": files["merges.txt"],
        "tokenizer.json": json.dumps(tokenizer_json(vocab, merge_rules(files["merges.txt"]))).encode(),
        "tokenizer_config.json": json.dumps(tokenizer_config(model_max_length), indent=2).encode(),
        "special_tokens_map.json": json.dumps({"bos_token": EOT_TEXT, "eos_token": EOT_TEXT, "unk_token": EOT_TEXT},
                                              indent=2).encode(),
    }
    for name, data in contents.items():
        write_bytes_atomic(out / name, data)
    return True

