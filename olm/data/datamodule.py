"""TextDataModule: corpus -> tokens on disk -> fixed-length windows, sampled deterministically, resumably, per rank.

Train sampling. The train stream of N tokens is cut into ``num_windows = (N - 1) // seq_len`` non-overlapping windows;
window w is ``tokens[w*L : w*L + L + 1]`` (input ``[:-1]``, target ``[1:]``). A global sample index g is window
``perm_e[g % num_windows]`` with ``e = g // num_windows`` and ``perm_e`` a permutation from
``np.random.default_rng([seed, e])``. Micro-batch b of rank r (of W, B windows per rank) is the global indices
``(start_batch + b)*B*W + r*B + i`` for i < B. So ranks are disjoint, one process with batch B*W sees the union of the
W ranks' batches, and a resumed run continues exactly where the data left off.

Val. The first ``val_batches*B*W`` windows of the val stream (or all of them), rounded down to a multiple of W and
split contiguously across ranks, in order.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
from itertools import chain
from pathlib import Path
from typing import Iterable, Iterator

import lightning as L
import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from .compressors import COMPRESSORS
from .corpus import SPLITS, BinCorpus, build_corpus
from .sampling import INFINITE, WindowBatchSampler
from .tokenizers import ByteTokenizer, Tokenizer, build_tokenizer, default_cache_dir
from .tokenizers import split_pieces as _pieces

SEPARATOR = "\n\n"  # joins documents when the tokenizer has no eos token
CACHE_VERSION = 1  # bump when the token-cache format or the joining rule changes
PIECE_CHARS = 1 << 20  # long documents are encoded in pieces this size so encode_batch can use every core
CHUNK_CHARS = 1 << 23  # text handed to the tokenizer per call: bounds memory on large corpora


class TokenWindows(Dataset):
    """Window w of a flat token file -> (input, target), both int64 [seq_len], target = input shifted by one."""

    def __init__(self, path: str | os.PathLike, dtype: str, seq_len: int):
        self.path, self.dtype, self.seq_len = str(path), np.dtype(dtype), seq_len
        self.num_tokens = os.path.getsize(self.path) // self.dtype.itemsize
        self._tokens = None

    @property
    def tokens(self) -> np.memmap:
        if self._tokens is None:  # opened lazily: in each worker, and again after unpickling
            self._tokens = np.memmap(self.path, dtype=self.dtype, mode="r")
        return self._tokens

    def __len__(self) -> int:
        return max(self.num_tokens - 1, 0) // self.seq_len

    def __getitem__(self, w: int) -> tuple[torch.Tensor, torch.Tensor]:
        L = self.seq_len
        chunk = torch.from_numpy(self.tokens[w * L: w * L + L + 1].astype(np.int64))  # [L+1]
        return chunk[:-1], chunk[1:]

    def __getstate__(self):  # no open file in a pickle (DDP spawn, spawned workers)
        return {**self.__dict__, "_tokens": None}


def tokenize_documents(docs: Iterable[str], tok: Tokenizer) -> Iterator[np.ndarray]:
    """Token arrays of the documents joined by the eos token (if the tokenizer has one) or by ``SEPARATOR`` text.
    The separator goes between documents, not after the last; empty documents are skipped."""
    sep = [tok.eos_id] if tok.eos_id is not None else tok.encode(SEPARATOR)

    def encode(batch: list[tuple[str, bool]]) -> np.ndarray:
        if isinstance(tok, ByteTokenizer):  # fast path: bytes are the tokens
            buf = b"".join((SEPARATOR.encode() if s else b"") + p.encode("utf-8") for p, s in batch)
            return np.frombuffer(buf, np.uint8)
        ids = tok.encode_batch([p for p, _ in batch])
        return np.fromiter(chain.from_iterable(chain(sep, x) if s else x for (_, s), x in zip(batch, ids)), np.int64)

    batch, size, first = [], 0, True  # batch: (piece, separator before it?)
    for doc in docs:
        if not doc:
            continue
        for j, piece in enumerate(_pieces(doc, PIECE_CHARS)):
            batch.append((piece, j == 0 and not first))
            first, size = False, size + len(piece)
            if size >= CHUNK_CHARS:
                yield encode(batch)
                batch, size = [], 0
    if batch:
        yield encode(batch)


def _atomic_write(path: Path, chunks: Iterable[bytes]) -> None:
    # write then rename: a concurrent rank or a killed run never leaves a half-written file under the final name
    tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
    with open(tmp, "wb") as f:
        for c in chunks:
            f.write(c)
    os.replace(tmp, path)


class TextDataModule(L.LightningDataModule):
    """Language-modelling data: see the module doc for the sampling scheme and docs/data.md for the config keys.

    Statistics (``vocab_size``, ``val_bytes_per_token``, ...) set the module up on first use, so they can be read
    before ``Trainer.fit`` (e.g. to size the model).
    """

    def __init__(self, source: str = "stdlib", path: str | None = None, pattern: str = "**/*.txt",
                 text_field: str = "text", token_dtype: str = "uint16", tokenizer: str = "byte",
                 tokenizer_vocab_size: int = 4096, tokenizer_path: str | None = None, vocab_size: int | None = None,
                 seq_len: int = 256, batch_size: int = 16, val_batches: int | None = None, val_fraction: float = 0.05,
                 seed: int = 0, num_workers: int = 0, pin_memory: bool | None = None,
                 cache_dir: str | None = None, sources: dict | None = None):
        super().__init__()
        for key, value, low in [("seq_len", seq_len, 1), ("batch_size", batch_size, 1), ("seed", seed, 0),
                                ("num_workers", num_workers, 0), ("val_batches", val_batches, 1)]:
            if value is not None and (not isinstance(value, int) or value < low):
                raise ValueError(f"data.{key}={value!r} must be an integer >= {low}")
        self.source, self.path, self.pattern, self.text_field = source, path, pattern, text_field
        self.token_dtype, self.val_fraction, self.seed = token_dtype, val_fraction, seed
        self.tokenizer_name, self.tokenizer_path = tokenizer, tokenizer_path
        self.tokenizer_vocab_size = tokenizer_vocab_size
        self.vocab_size_cfg = vocab_size  # the vocab_size property resolves None to the tokenizer's
        self.seq_len, self.batch_size, self.val_batches = seq_len, batch_size, val_batches
        self.num_workers = num_workers
        self.pin_memory = torch.cuda.is_available() if pin_memory is None else pin_memory
        self.cache_dir = Path(cache_dir or default_cache_dir())
        self.consumed_batches: int | None = None  # set to override the resume position read from the trainer
        self.sources = dict(sources or {})
        self._corpus = self._tokenizer = self._train = self._val = None
        self._prepared = None  # data.source='prepared': the checked sources (olm.data.prepared)
        self._val_text_cache: dict[int, tuple[bytes | None, int]] = {}  # keyed by num_val_windows()
        self._compressed_cache: dict[int, dict[str, float]] = {}

    # ---- corpus, tokenizer, token cache

    @property
    def is_prepared(self) -> bool:
        return self.source == "prepared"

    @property
    def prepared(self):
        """The prepared sources (``data.source='prepared'``), checked: olm.data.prepared.open_sources."""
        if self._prepared is None:
            from .prepared import open_sources

            named = None
            if self.tokenizer_name == "hf" and self.tokenizer_path:
                named = build_tokenizer("hf", path=self.tokenizer_path)
            self._prepared = open_sources(self.sources, self.path, self.seq_len, named)
        return self._prepared

    @property
    def corpus(self):
        if self.is_prepared:
            raise ValueError("data.source='prepared' has no text corpus: its sources are already tokenized")
        if self._corpus is None:
            self._corpus = build_corpus(self.source, self.path, self.pattern, self.text_field, self.token_dtype,
                                        self.val_fraction)
        return self._corpus

    @property
    def is_bin(self) -> bool:
        return not self.is_prepared and isinstance(self.corpus, BinCorpus)

    @property
    def tokenizer(self) -> Tokenizer | None:
        """The tokenizer; for ``bin`` sources None unless ``data.tokenizer='hf'`` names one (to decode samples); for
        prepared sources the one saved with them."""
        if self._tokenizer is None and self.is_prepared:
            self._tokenizer = self.prepared[0].tokenizer()
        if self._tokenizer is None and not (self.is_bin and self.tokenizer_name == "byte"):
            self._tokenizer = build_tokenizer(self.tokenizer_name, corpus=self.corpus,
                                              vocab_size=self.tokenizer_vocab_size, path=self.tokenizer_path,
                                              cache_dir=self.cache_dir)
        return self._tokenizer

    @property
    def vocab_size(self) -> int:
        """``data.vocab_size`` if set (it may exceed the tokenizer's, e.g. to pad), else the tokenizer's."""
        tok = self.tokenizer
        if self.vocab_size_cfg is None:
            if tok is None:
                raise ValueError("data.vocab_size=None: data.source='bin' needs data.vocab_size "
                                 "(or data.tokenizer='hf')")
            return tok.vocab_size
        if tok is not None and self.vocab_size_cfg < tok.vocab_size:
            raise ValueError(f"data.vocab_size={self.vocab_size_cfg} is smaller than the vocab of "
                             f"data.tokenizer={tok.name!r} ({tok.vocab_size})")
        return self.vocab_size_cfg

    def _token_cache(self) -> Path:
        """Tokenize both splits once into ``cache_dir/tokens/<key>/``; later calls (and runs) find them there."""
        tok = self.tokenizer
        key = hashlib.sha1(json.dumps([self.corpus.fingerprint(), tok.fingerprint, CACHE_VERSION]).encode())
        out = self.cache_dir / "tokens" / f"{self.source}-{tok.name}-{key.hexdigest()[:16]}"
        if (out / "meta.json").exists():
            return out
        out.mkdir(parents=True, exist_ok=True)
        dtype = np.uint16 if tok.vocab_size <= 65536 else np.uint32
        meta = {"dtype": np.dtype(dtype).name, "tokenizer": tok.name, "vocab_size": tok.vocab_size}
        for split in SPLITS:
            stats = {"num_tokens": 0, "max_id": -1}

            def chunks():
                for ids in tokenize_documents(self.corpus.documents(split), tok):
                    stats["num_tokens"] += len(ids)
                    stats["max_id"] = max(stats["max_id"], int(ids.max()))
                    yield ids.astype(dtype).tobytes()

            _atomic_write(out / f"{split}.bin", chunks())
            meta[split] = stats
        if tok.token_bytes is None:  # bytes can't be recovered from tokens: keep the val text for bits-per-byte
            sep = "" if tok.eos_id is not None else SEPARATOR
            docs = (d for d in self.corpus.documents("val") if d)
            _atomic_write(out / "val.txt", [sep.join(docs).encode("utf-8")])
        _atomic_write(out / "meta.json", [json.dumps(meta).encode()])  # last: marks the cache complete
        return out

    def _bin_max_id(self, split: str) -> int:
        # a full pass over a large file: cached next to the token caches, keyed by the file's identity
        f = self.cache_dir / "tokens" / f"bin-max-{self.corpus.fingerprint()[:16]}-{split}.json"
        if f.exists():
            return json.loads(f.read_text())["max_id"]
        tokens, step = self.corpus.tokens(split), 1 << 24
        max_id = max(int(tokens[i:i + step].max()) for i in range(0, len(tokens), step))
        f.parent.mkdir(parents=True, exist_ok=True)
        _atomic_write(f, [json.dumps({"max_id": max_id}).encode()])
        return max_id

    def prepare_data(self) -> None:
        # Lightning calls this on one process per node before setup(): the expensive, once-only work
        if not self.is_bin and not self.is_prepared:
            self._token_cache()

    def setup(self, stage: str | None = None) -> None:
        if self._train is not None:
            return
        V = self.vocab_size  # first: a missing vocab size fails before any pass over the data
        if self.is_prepared:
            self._setup_prepared(V)
            return
        if self.is_bin:
            files = {s: (self.corpus.file(s), self.corpus.dtype.name, self._bin_max_id(s)) for s in SPLITS}
        else:
            out = self._token_cache()
            meta = json.loads((out / "meta.json").read_text())
            files = {s: (out / f"{s}.bin", meta["dtype"], meta[s]["max_id"]) for s in SPLITS}
        for split, (_, _, max_id) in files.items():
            if max_id >= V:
                raise ValueError(f"token id {max_id} in the {split} split is >= the vocab size {V} "
                                 f"(data.vocab_size={self.vocab_size_cfg}, data.tokenizer={self.tokenizer_name!r})")
        train, val = (TokenWindows(f, dtype, self.seq_len) for f, dtype, _ in files.values())
        for split, ds in (("val", val), ("train", train)):
            if ds.num_tokens < self.seq_len + 1:
                raise ValueError(f"data.seq_len={self.seq_len} needs at least {self.seq_len + 1} tokens per split; "
                                 f"the {split} split has {ds.num_tokens}")
        self._train, self._val = train, val

    def _setup_prepared(self, vocab_size: int) -> None:
        from .mixture import MixtureWindows
        from .prepared import StreamWindows

        for src in self.prepared:
            for split in SPLITS:
                if src.max_id(split) >= vocab_size:
                    raise ValueError(f"token id {src.max_id(split)} in the {split} split of {src.key} is >= the vocab "
                                     f"size {vocab_size} (data.vocab_size={self.vocab_size_cfg})")
        self._val_parts = [StreamWindows(src.tokens("val"), self.seq_len) for src in self.prepared]
        self._train = MixtureWindows([StreamWindows(src.tokens("train"), self.seq_len) for src in self.prepared])
        self._val = self._val_parts[0]

    # ---- loaders

    def _rank_world(self) -> tuple[int, int]:
        t = self.trainer
        return (t.global_rank, t.world_size) if t is not None else (0, 1)

    def start_batch(self) -> int:
        """Micro-batches (per rank) already consumed: ``consumed_batches`` if set, else the trainer's
        ``global_step * accumulate_grad_batches``, i.e. exactly the batches behind the restored weights (a checkpoint
        holds no partial accumulation, so batches of an unfinished step are replayed), else 0."""
        if self.consumed_batches is not None:
            return int(self.consumed_batches)
        t = self.trainer
        return t.global_step * t.accumulate_grad_batches if t is not None else 0

    def _loader(self, ds: Dataset, batches) -> DataLoader:
        return DataLoader(ds, batch_sampler=batches, num_workers=self.num_workers, pin_memory=self.pin_memory,
                          persistent_workers=self.num_workers > 0)

    def train_sampler(self) -> WindowBatchSampler:
        self.setup()
        rank, world = self._rank_world()
        start, t, num = self.start_batch(), self.trainer, INFINITE
        if t is not None and t.max_steps is not None and t.max_steps > 0:
            num = max(t.max_steps * t.accumulate_grad_batches - start, 0)
        if self.is_prepared:
            from .mixture import MixtureBatchSampler

            return MixtureBatchSampler([len(p) for p in self._train.parts], [s.weight for s in self.prepared],
                                       self.batch_size, self.seed, rank, world, start, num)
        return WindowBatchSampler(len(self._train), self.batch_size, self.seed, rank, world, start, num)

    def train_dataloader(self) -> DataLoader:
        sampler = self.train_sampler()  # sets up first
        return self._loader(self._train, sampler)

    def num_val_windows(self, val: Dataset | None = None) -> int:
        """Val windows evaluated over all ranks (of ``val``, a prepared source's val windows; default the val
        split): a multiple of the world size."""
        self.setup()
        world = self._rank_world()[1]
        val = self._val if val is None else val
        n = len(val)
        if self.val_batches is not None:
            n = min(n, self.val_batches * self.batch_size * world)
        if n < world:
            raise ValueError(f"data.seq_len={self.seq_len} leaves {len(val)} val windows, fewer than the "
                             f"{world} ranks")
        return n - n % world

    def _val_loader(self, val: Dataset) -> DataLoader:
        rank, world = self._rank_world()
        per = self.num_val_windows(val) // world
        lo, hi = rank * per, (rank + 1) * per
        batches = [list(range(i, min(i + self.batch_size, hi))) for i in range(lo, hi, self.batch_size)]
        return self._loader(val, batches)

    def val_dataloader(self) -> DataLoader | list[DataLoader]:
        """The val split's loader; for prepared sources one loader per source, in ``val_source_names()`` order."""
        self.setup()
        if self.is_prepared:
            return [self._val_loader(val) for val in self._val_parts]
        return self._val_loader(self._val)

    def val_source_names(self) -> list[str]:
        """The names of the val loaders (prepared sources), [] for the other sources (one val split)."""
        return [src.name for src in self.prepared] if self.is_prepared else []

    def source_bytes_per_token(self) -> list[float | None]:
        """Bytes per val token of each prepared source (``val_source_names()`` order)."""
        self.setup()
        counts = [self._prepared_val_text([i])[1:] for i in range(len(self._val_parts))]
        return [nbytes / tokens for tokens, nbytes in counts]

    # ---- statistics

    @property
    def num_train_tokens(self) -> int:
        self.setup()
        if self.is_prepared:
            return sum(p.num_tokens for p in self._train.parts)
        return self._train.num_tokens

    @property
    def num_val_tokens(self) -> int:
        self.setup()
        if self.is_prepared:
            return sum(p.num_tokens for p in self._val_parts)
        return self._val.num_tokens

    def _prepared_val_text(self, parts: list[int]) -> tuple[bytes | None, int, int]:
        """(the bytes if known, tokens, bytes) of the evaluated val windows of the prepared sources ``parts``: exact
        with a byte-level tokenizer; else (None, the manifests' tokens and bytes of the whole val splits)."""
        tok, texts, tokens, nbytes = self.tokenizer, [], 0, 0
        for i in parts:
            val, src = self._val_parts[i], self.prepared[i]
            if tok.token_bytes is not None:
                span = val.stream.read(1, self.num_val_windows(val) * self.seq_len)
                texts.append(b"".join(map(tok.token_bytes.__getitem__, span.tolist())))
                tokens += len(span)
            else:
                split = src.manifest["splits"]["val"]
                nbytes, tokens = nbytes + split["num_bytes"], tokens + split["num_tokens"]
        if tok.token_bytes is None:
            return None, tokens, nbytes
        text = b"".join(texts)
        return text, tokens, len(text)

    def val_text(self) -> tuple[bytes | None, int]:
        """(UTF-8 bytes, tokens) that bits-per-byte is measured over.

        With a byte-level tokenizer (byte, bpe, byte-level hf): exactly the evaluated targets, i.e. val tokens
        ``[1 : num_val_windows*seq_len + 1]``, and their bytes (eos: 0 bytes; the "\\n\\n" separator: 2 bytes).
        Otherwise the whole val split's text and token count. ``(None, 0)`` when the text is unknown (bin without a
        byte-level tokenizer).
        """
        n = self.num_val_windows()
        if self.is_prepared:
            if n not in self._val_text_cache:
                text, tokens, _ = self._prepared_val_text(list(range(len(self._val_parts))))
                self._val_text_cache[n] = (text, tokens if text is not None else 0)
            return self._val_text_cache[n]
        if n not in self._val_text_cache:
            tok, span = self.tokenizer, self._val.tokens[1: n * self.seq_len + 1]
            if tok is not None and tok.token_bytes is not None:
                if isinstance(tok, ByteTokenizer):
                    text = span.astype(np.uint8).tobytes()
                else:
                    text = b"".join(map(tok.token_bytes.__getitem__, span.tolist()))
                self._val_text_cache[n] = (text, len(span))
            elif not self.is_bin:
                text = (Path(self._val.path).parent / "val.txt").read_bytes()
                self._val_text_cache[n] = (text, self._val.num_tokens)
            else:
                self._val_text_cache[n] = (None, 0)
        return self._val_text_cache[n]

    @property
    def val_bytes_per_token(self) -> float | None:
        """UTF-8 bytes per val token over ``val_text()``; None for a bin source without a byte-level tokenizer."""
        if self.is_prepared:
            _, tokens, nbytes = self._prepared_val_text(list(range(len(self._val_parts))))
            return nbytes / tokens
        text, tokens = self.val_text()
        return None if text is None else len(text) / tokens

    def bits_per_byte(self, loss_nats: float) -> float | None:
        """Mean val loss (nats per target token, over the windows of ``val_dataloader``) -> bits per UTF-8 byte."""
        bpt = self.val_bytes_per_token
        return None if bpt is None else loss_nats / math.log(2) / bpt

    def compressor_bits_per_byte(self) -> dict[str, float] | None:
        """Reference compressors on the bytes bpb is over: 8 * len(compress(val_text)) / len(val_text) for each of
        ``COMPRESSORS`` (gzip -9, bz2 -9, xz -9e); None when the text is unknown."""
        text, _ = self.val_text()
        if text is None:
            return None
        n = self.num_val_windows()
        if n not in self._compressed_cache:
            self._compressed_cache[n] = {name: 8 * len(compress(text)) / len(text)
                                         for name, (_, compress) in COMPRESSORS.items()}
        return self._compressed_cache[n]

    def gzip_bits_per_byte(self) -> float | None:
        """gzip -9's bits per byte on the bytes bpb is over (``compressor_bits_per_byte``)."""
        figures = self.compressor_bits_per_byte()
        return None if figures is None else figures["gzip"]
