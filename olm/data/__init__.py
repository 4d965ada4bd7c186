"""Data: text sources, tokenizers and the Lightning datamodule. Imports nothing from other olm packages.

The datamodule's names load Lightning on first use, so that reading a tokenizer or a corpus (as composing a config
does, to know the vocabulary size) stays quick.
"""

from .corpus import (SOURCES, BinCorpus, Corpus, FileCorpus, HFDatasetCorpus, StdlibCorpus, TextFileCorpus,
                     build_corpus, is_val, stdlib_files)
from .tokenizers import (TOKENIZERS, ByteTokenizer, HFTokenizer, Tokenizer, build_tokenizer, known_vocab_size,
                         load_tokenizer)

DATAMODULE_NAMES = ("SEPARATOR", "TextDataModule", "TokenWindows", "WindowBatchSampler", "tokenize_documents")

__all__ = [
    "SOURCES", "TOKENIZERS", "Corpus", "FileCorpus", "StdlibCorpus", "TextFileCorpus", "HFDatasetCorpus",
    "BinCorpus", "build_corpus", "is_val", "stdlib_files", "Tokenizer", "ByteTokenizer", "HFTokenizer",
    "build_tokenizer", "known_vocab_size", "load_tokenizer", *DATAMODULE_NAMES,
]


def __getattr__(name: str):
    if name in DATAMODULE_NAMES:
        from . import datamodule

        return getattr(datamodule, name)
    raise AttributeError(f"module 'olm.data' has no attribute {name!r}")
