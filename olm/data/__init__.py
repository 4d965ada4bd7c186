"""Data: text sources, tokenizers and the Lightning datamodule. Imports nothing from other olm packages."""

from .corpus import (SOURCES, BinCorpus, Corpus, FileCorpus, HFDatasetCorpus, StdlibCorpus, TextFileCorpus,
                     build_corpus, is_val, stdlib_files)
from .datamodule import SEPARATOR, TextDataModule, TokenWindows, WindowBatchSampler, tokenize_documents
from .tokenizers import (TOKENIZERS, ByteTokenizer, HFTokenizer, Tokenizer, build_tokenizer, known_vocab_size,
                         load_tokenizer)

__all__ = [
    "SOURCES", "TOKENIZERS", "SEPARATOR", "Corpus", "FileCorpus", "StdlibCorpus", "TextFileCorpus", "HFDatasetCorpus",
    "BinCorpus", "build_corpus", "is_val", "stdlib_files", "Tokenizer", "ByteTokenizer", "HFTokenizer",
    "build_tokenizer", "known_vocab_size", "load_tokenizer", "TextDataModule", "TokenWindows", "WindowBatchSampler", "tokenize_documents",
]
