"""``olm data prepare``: a text corpus -> shards of fixed-width token ids and a manifest, in parallel and resumably.

The input is read through olm's corpora (``olm.data.corpus``): a text file or a directory of text files (one document
per file, split by the hash of the file's path), or local Hugging Face dataset files (JSONL, Parquet, Arrow; one
document per row, split by file name or by the hash of the text). Documents are streamed: batches of them are
tokenized by a pool of processes (``workers``), results come back in input order, and at most a few batches per worker
are in flight, so memory does not depend on the corpus size.

Output directory::

    tokenizer/              the tokenizer (``Tokenizer.save``); manifest["tokenizer"]["identity"] is its hash
    recipe.json             the settings; resuming with other settings is refused
    train/shard_00000.bin   token ids (uint16 when the vocabulary fits, else uint32); every document is followed by
                            the separator (the tokenizer's eos, else the text "\\n\\n")
    train/shard_00000.json  the shard's record; written after the .bin is complete, it marks the shard finished
    val/...                 the held-out split, the same way
    manifest.json           written last and atomically: its presence means the dataset is complete

A shard is closed at the first document end at or past ``shard_tokens`` tokens, so shard boundaries depend only on
the documents and the tokenizer. A killed run, started again with the same arguments, keeps the finished shards and
goes on from the document after the last one (it re-reads, but does not re-tokenize, the documents before).
"""

from __future__ import annotations

import collections
import json
import os
import shutil
import sys
import time
from dataclasses import asdict, dataclass
from itertools import chain, islice
from pathlib import Path
from typing import Iterator

import numpy as np

from .corpus import HF_EXTENSIONS, SPLITS, FileCorpus, HFDatasetCorpus, build_corpus
from .tokenizers import (TOKENIZERS, ByteTokenizer, Tokenizer, build_bpe, default_cache_dir, load_hf, load_tokenizer,
                         split_pieces)

FORMAT_VERSION = 1  # manifest["version"]; bump when the layout changes
SEPARATOR = "\n\n"  # after each document when the tokenizer has no eos (as olm's other sources join documents)
PIECE_CHARS = 1 << 20  # long documents are encoded in pieces of about this many chars (bounded memory per task)
BATCH_CHARS = 1 << 22  # text per task handed to a worker
IN_FLIGHT_PER_WORKER = 4  # tasks queued per worker: enough to keep it busy, few enough to bound memory
INPUT_FORMATS = ("auto", "text", "hf_dataset")


@dataclass
class Recipe:
    """What determines the output; a resume must match it exactly."""

    input: str
    format: str
    pattern: str
    text_field: str
    val_fraction: float
    shard_tokens: int
    tokenizer: str  # the tokenizer's name
    tokenizer_identity: str
    dtype: str


def token_dtype(vocab_size: int) -> np.dtype:
    return np.dtype(np.uint16 if vocab_size <= 65536 else np.uint32)


def detect_format(path: Path, pattern: str) -> str:
    """``hf_dataset`` for a JSONL/Parquet/Arrow file, or a directory holding such files and no text file matching
    ``pattern``; else ``text``."""
    if path.is_file():
        return "hf_dataset" if path.name.endswith(HF_EXTENSIONS) else "text"
    if any(path.glob(pattern)):
        return "text"
    has_rows = any(f.name.endswith(HF_EXTENSIONS) for f in path.rglob("*") if f.is_file())
    return "hf_dataset" if has_rows else "text"


def resolve_tokenizer(name: str | None, path: str | None, corpus, vocab_size: int, cache_dir) -> Tokenizer:
    """The tokenizer to prepare with. ``path`` may be a folder written by ``Tokenizer.save`` (a run's ``tokenizer/``
    or a prepared dataset's), a prepared dataset (its tokenizer is reused, so that several sources share one), or a
    Hugging Face ``tokenizer.json`` / folder holding one; ``name`` then defaults to what the path holds."""
    if path:
        p = Path(path).expanduser()
        if not p.exists():
            raise ValueError(f"--tokenizer-path={str(path)!r} does not exist")
        if (p / "manifest.json").is_file():
            p = p / "tokenizer"
        if (p / "tokenizer_meta.json").is_file():
            tok = load_tokenizer(p)
            if name not in (None, tok.name, "hf"):
                raise ValueError(f"--tokenizer={name!r} contradicts --tokenizer-path={str(path)!r}, which holds a "
                                 f"{tok.name!r} tokenizer; leave --tokenizer out")
            return tok
        if name not in (None, "hf"):
            raise ValueError(f"--tokenizer={name!r} takes no --tokenizer-path (a tokenizer.json is --tokenizer hf)")
        return load_hf(p)
    name = name or "byte"
    if name == "byte":
        return ByteTokenizer()
    if name == "bpe":
        return build_bpe(corpus, vocab_size, cache_dir)
    if name == "hf":
        raise ValueError("--tokenizer=hf needs --tokenizer-path (a tokenizer.json or a folder holding one)")
    raise ValueError(f"--tokenizer={name!r} is not known; known: {', '.join(TOKENIZERS)}")


# -- workers ---------------------------------------------------------------------------------------------------------
_worker_tokenizer: Tokenizer | None = None


def _init_worker(tok: Tokenizer) -> None:
    global _worker_tokenizer
    # one thread per process: the pool is the parallelism, the tokenizers library's own threads would oversubscribe
    os.environ["TOKENIZERS_PARALLELISM"] = "false"
    _worker_tokenizer = tok


def encode_documents(docs: list[str], tok: Tokenizer | None = None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(token ids of the documents, each followed by the separator; tokens per document; UTF-8 bytes per document,
    separator text included). Long documents are encoded in pieces cut at newlines (``split_pieces``)."""
    tok = tok or _worker_tokenizer
    dtype = token_dtype(tok.vocab_size)
    if isinstance(tok, ByteTokenizer):  # the bytes are the ids
        encoded = [(d + SEPARATOR).encode("utf-8") for d in docs]
        lengths = np.fromiter(map(len, encoded), np.int64, len(encoded))
        return np.frombuffer(b"".join(encoded), np.uint8).astype(dtype), lengths, lengths
    sep = [tok.eos_id] if tok.eos_id is not None else tok.encode(SEPARATOR)
    sep_bytes = 0 if tok.eos_id is not None else len(SEPARATOR)
    text_bytes = np.fromiter((len(d.encode("utf-8")) + sep_bytes for d in docs), np.int64, len(docs))
    pieces, owner = [], []  # owner: the document each piece belongs to
    for i, doc in enumerate(docs):
        for piece in split_pieces(doc, PIECE_CHARS):
            pieces.append(piece)
            owner.append(i)
    lengths = np.full(len(docs), len(sep), np.int64)
    parts = []
    for j, ids in enumerate(tok.encode_batch(pieces)):
        parts.append(ids)
        lengths[owner[j]] += len(ids)
        if j + 1 == len(owner) or owner[j + 1] != owner[j]:  # the document's last piece
            parts.append(sep)
    return np.fromiter(chain.from_iterable(parts), dtype, int(lengths.sum())), lengths, text_bytes


# -- shards ----------------------------------------------------------------------------------------------------------
def shard_name(index: int) -> str:
    return f"shard_{index:05d}"


def write_atomic(path: Path, data: bytes) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)


def finished_shards(split_dir: Path, itemsize: int) -> list[dict]:
    """The records of the finished shards (0, 1, ... without a gap) whose .bin has the recorded size."""
    records = []
    while True:
        record_file = split_dir / f"{shard_name(len(records))}.json"
        if not record_file.is_file():
            return records
        record = json.loads(record_file.read_text())
        bin_file = split_dir / record["file"]
        if not bin_file.is_file() or bin_file.stat().st_size != record["num_tokens"] * itemsize:
            return records
        records.append(record)


class ShardWriter:
    """Appends documents' tokens to the split's current shard and closes it at the first document end at or past
    ``shard_tokens``: the .bin goes from a temporary name to its own, then its record marks it finished."""

    def __init__(self, split_dir: Path, dtype: np.dtype, shard_tokens: int, done: list[dict]):
        self.dir, self.dtype, self.shard_tokens = split_dir, dtype, shard_tokens
        self.records = list(done)
        # the split's first (non-empty) document not in a finished shard
        self.next_doc = done[-1]["next_doc"] if done else 0
        self._file = None
        self._tokens = self._docs = self._bytes = 0
        self._max_id = -1
        for stale in split_dir.glob(".shard_*.tmp"):  # a killed run's unfinished shard: written again
            stale.unlink()

    def _open(self) -> None:
        self._tmp = self.dir / f".{shard_name(len(self.records))}.bin.{os.getpid()}.tmp"
        self._file = open(self._tmp, "wb")

    def add(self, ids: np.ndarray, lengths: np.ndarray, text_bytes: np.ndarray) -> None:
        """Tokens of consecutive documents (``lengths`` per document, ``text_bytes`` their UTF-8 sizes)."""
        start, doc = 0, 0
        while doc < len(lengths):
            if self._file is None:
                self._open()
            ends = start + np.cumsum(lengths[doc:])  # where each remaining document ends in ``ids``
            need = self.shard_tokens - self._tokens
            # the first document whose end reaches the shard size closes the shard; else all go in
            k = int(np.searchsorted(ends - start, need)) + 1
            k = min(k, len(ends))
            end = int(ends[k - 1])
            chunk = ids[start:end]
            self._file.write(chunk.tobytes())
            if len(chunk):
                self._max_id = max(self._max_id, int(chunk.max()))
            self._tokens += end - start
            self._docs += k
            self._bytes += int(text_bytes[doc:doc + k].sum())
            self.next_doc += k
            start, doc = end, doc + k
            if self._tokens >= self.shard_tokens:
                self._close()

    def _close(self) -> None:
        self._file.close()
        self._file = None
        name = shard_name(len(self.records))
        os.replace(self._tmp, self.dir / f"{name}.bin")
        record = {"file": f"{name}.bin", "num_tokens": self._tokens, "num_documents": self._docs,
                  "num_bytes": self._bytes, "max_id": self._max_id, "next_doc": self.next_doc}
        write_atomic(self.dir / f"{name}.json", json.dumps(record).encode())
        self.records.append(record)
        self._tokens = self._docs = self._bytes = 0
        self._max_id = -1

    def finish(self) -> list[dict]:
        if self._file is not None and self._tokens:
            self._close()
        elif self._file is not None:
            self._file.close()
            self._tmp.unlink()
            self._file = None
        return self.records


# -- progress --------------------------------------------------------------------------------------------------------
class Progress:
    """A tqdm bar in bytes of text when tqdm is installed, else a line on stderr every few seconds."""

    def __init__(self, split: str, total: int | None, enabled: bool):
        self.enabled, self.split, self.total, self.done, self.tokens = enabled, split, total, 0, 0
        self._bar, self._last = None, time.time()
        if not enabled:
            return
        try:
            from tqdm import tqdm
        except ImportError:
            return
        self._bar = tqdm(total=total, unit="B", unit_scale=True, desc=split, file=sys.stderr, dynamic_ncols=True)

    def update(self, text_bytes: int, tokens: int) -> None:
        self.done, self.tokens = self.done + text_bytes, self.tokens + tokens
        if self._bar is not None:
            self._bar.update(text_bytes)
            self._bar.set_postfix(tokens=f"{self.tokens:,}", refresh=False)
        elif self.enabled and time.time() - self._last > 5:
            self._last = time.time()
            of = f" of {self.total / 1e6:.1f}" if self.total else ""
            print(f"{self.split}: {self.done / 1e6:.1f}{of} MB, {self.tokens:,} tokens", file=sys.stderr, flush=True)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()


# -- the command -----------------------------------------------------------------------------------------------------
def _batches(docs: Iterator[str]) -> Iterator[list[str]]:
    batch, size = [], 0
    for doc in docs:
        batch.append(doc)
        size += len(doc)
        if size >= BATCH_CHARS:
            yield batch
            batch, size = [], 0
    if batch:
        yield batch


def _ordered_map(fn, batches: Iterator[list[str]], workers: int, tok: Tokenizer):
    """fn(batch) in input order; with ``workers`` > 1 over a process pool with a bounded queue (Pool.imap
    would read the whole input ahead of the workers)."""
    if workers <= 1:
        for batch in batches:
            yield fn(batch, tok)
        return
    import multiprocessing as mp

    # the tokenizers library warns (and turns its threads off) in processes forked after it used them
    before = os.environ.get("TOKENIZERS_PARALLELISM")
    os.environ["TOKENIZERS_PARALLELISM"] = "false"
    # fork where there is one: spawned workers re-import the caller's main module, which a script on stdin or in a
    # notebook does not have as a file
    context = mp.get_context("fork" if "fork" in mp.get_all_start_methods() else None)
    try:
        with context.Pool(workers, initializer=_init_worker, initargs=(tok,)) as pool:
            pending = collections.deque()
            for batch in batches:
                pending.append(pool.apply_async(fn, (batch,)))
                if len(pending) >= workers * IN_FLIGHT_PER_WORKER:
                    yield pending.popleft().get()
            while pending:
                yield pending.popleft().get()
    finally:  # the caller's own later tokenizing keeps its threads
        if before is None:
            os.environ.pop("TOKENIZERS_PARALLELISM", None)
        else:
            os.environ["TOKENIZERS_PARALLELISM"] = before


def _input_files(corpus, split: str) -> list[tuple[str, int]]:
    """(path relative to the input, bytes) of the files the split's documents come from."""
    if isinstance(corpus, FileCorpus):
        root, rels = corpus.root, corpus.files(split)
    elif isinstance(corpus, HFDatasetCorpus):
        root, rels = corpus.root, corpus.files[split]
    else:  # one text file, split by lines
        root, rels = corpus.path.parent, [corpus.path.name]
    return [(r, (root / r).stat().st_size) for r in rels]


def prepare(input_path, out_dir, *, tokenizer: str | None = None, tokenizer_path: str | None = None,
            vocab_size: int = 4096, format: str = "auto", pattern: str = "**/*.txt", text_field: str = "text",
            val_fraction: float = 0.05, shard_tokens: int = 1 << 27, workers: int | None = None,
            cache_dir: str | None = None, progress: bool = True) -> dict:
    """Tokenize ``input_path`` into ``out_dir`` (module doc); returns the manifest. Errors are one-line
    ValueErrors naming the argument."""
    if input_path is None or not Path(input_path).expanduser().exists():
        raise ValueError(f"input {str(input_path)!r} does not exist (a text file or folder, JSONL, Parquet, "
                         "Arrow, or a local Hugging Face dataset folder)")
    if format not in INPUT_FORMATS:
        raise ValueError(f"--format={format!r} is not known; known: {', '.join(INPUT_FORMATS)}")
    if not isinstance(shard_tokens, int) or shard_tokens < 1:
        raise ValueError(f"--shard-tokens={shard_tokens!r} must be a positive integer")
    path = Path(input_path).expanduser().resolve()
    fmt = detect_format(path, pattern) if format == "auto" else format
    corpus = build_corpus(fmt, path, pattern, text_field, val_fraction=val_fraction)
    tok = resolve_tokenizer(tokenizer, tokenizer_path, corpus, vocab_size, cache_dir or default_cache_dir())
    dtype = token_dtype(tok.vocab_size)
    recipe = Recipe(str(path), fmt, pattern, text_field, val_fraction, shard_tokens, tok.name, tok.identity,
                    dtype.name)
    out = Path(out_dir).expanduser()
    fresh = not out.exists() or not any(out.iterdir())
    _start_or_resume(out, recipe)
    try:
        return _write(out, path, corpus, tok, dtype, recipe, workers, progress)
    except ValueError:
        if fresh:  # an input mistake found while writing: the corrected command starts in a clean --out
            shutil.rmtree(out, ignore_errors=True)
        raise


def _write(out: Path, path: Path, corpus, tok, dtype, recipe: Recipe, workers: int | None, progress: bool) -> dict:
    """The shards of each split, then the manifest (written last: a dataset is finished when it has one)."""
    val_fraction, shard_tokens = recipe.val_fraction, recipe.shard_tokens
    tok.save(out / "tokenizer")
    if workers is None:  # the cores this process may run on (a container or a job step may have fewer)
        workers = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1

    splits = {}
    for split in SPLITS:
        split_dir = out / split
        split_dir.mkdir(exist_ok=True)
        writer = ShardWriter(split_dir, dtype, shard_tokens, finished_shards(split_dir, dtype.itemsize))
        files = _input_files(corpus, split)
        total = sum(size for _, size in files) if isinstance(corpus, FileCorpus) else None
        bar = Progress(split, total, progress)
        # empty documents are skipped (no separator either); finished shards' documents are read, not tokenized
        docs = islice((d for d in corpus.documents(split) if d), writer.next_doc, None)
        for ids, lengths, text_bytes in _ordered_map(encode_documents, _batches(docs), workers, tok):
            writer.add(ids, lengths, text_bytes)
            bar.update(int(text_bytes.sum()), len(ids))
        bar.close()
        records = writer.finish()
        if not records:
            raise ValueError(f"--val-fraction={val_fraction} leaves the {split} split of {str(path)!r} without "
                             f"text; change --val-fraction or add documents")
        splits[split] = {
            "num_tokens": sum(r["num_tokens"] for r in records),
            "num_documents": sum(r["num_documents"] for r in records),
            "num_bytes": sum(r["num_bytes"] for r in records),
            "max_id": max(r["max_id"] for r in records),
            "shards": [{"file": f"{split}/{r['file']}", "num_tokens": r["num_tokens"]} for r in records],
            "input_files": [{"path": rel, "bytes": size} for rel, size in files],
        }
    manifest = {
        "format": "olm-prepared", "version": FORMAT_VERSION,
        "tokenizer": {"name": tok.name, "identity": tok.identity, "vocab_size": tok.vocab_size, "eos_id": tok.eos_id,
                      "dir": "tokenizer"},
        "dtype": dtype.name,
        "separator": "eos" if tok.eos_id is not None else SEPARATOR,
        "recipe": asdict(recipe),
        "splits": splits,
    }
    write_atomic(out / "manifest.json", (json.dumps(manifest, indent=1) + "\n").encode())
    return manifest


def _start_or_resume(out: Path, recipe: Recipe) -> None:
    """A new output dir gets the recipe; an existing one must hold the same recipe (its finished shards are then
    kept) and no manifest (a finished dataset is never overwritten)."""
    if (out / "manifest.json").exists():
        raise ValueError(f"--out={str(out)!r} already holds a prepared dataset (manifest.json); choose another "
                         "--out or delete it")
    recipe_file = out / "recipe.json"
    if recipe_file.is_file():
        old = json.loads(recipe_file.read_text())
        changed = [k for k, v in asdict(recipe).items() if old.get(k) != v]
        if changed:
            shown = ", ".join(f"{k}={old.get(k)!r} (now {getattr(recipe, k)!r})" for k in changed[:3])
            raise ValueError(f"--out={str(out)!r} holds an unfinished run with other settings: {shown}; resume with "
                             "the same arguments, or choose another --out")
        return
    if out.exists() and any(out.iterdir()):
        raise ValueError(f"--out={str(out)!r} is not empty and holds no unfinished prepare run; choose another --out")
    out.mkdir(parents=True, exist_ok=True)
    write_atomic(recipe_file, (json.dumps(asdict(recipe), indent=1) + "\n").encode())
