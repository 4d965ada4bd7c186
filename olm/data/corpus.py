"""Text sources, each split deterministically into train and val.

A text corpus yields documents (str) per split; a token corpus (``bin``) yields token arrays. Every corpus has a
``fingerprint()``: a hash of what it would yield, used as the cache key for tokenizers and token arrays.

Splits are decided by hashing a stable key (a file's relative path, or a document's text), never by position in a
listing, so adding a file never moves another file across the split and the same file is never in both splits.

Errors are one-line ``ValueError``s naming the ``data.*`` config key at fault.
"""

from __future__ import annotations

import hashlib
import json
import os
import sysconfig
from pathlib import Path
from typing import Iterator

import numpy as np

SOURCES = ("stdlib", "text", "bin", "hf_dataset", "prepared")  # prepared: olm.data.prepared
SPLITS = ("train", "val")
# a folder with one of these names anywhere below the stdlib root excludes everything under it
STDLIB_EXCLUDE = frozenset({"test", "tests", "idle_test", "site-packages", "dist-packages", "__pycache__"})
HF_EXTENSIONS = (".parquet", ".jsonl", ".arrow")
TOKEN_DTYPES = ("uint16", "uint32")


def is_val(key: str, val_fraction: float) -> bool:
    """The split rule: ``key`` (a relative path or a document) goes to val iff its hash falls below the fraction."""
    return int(hashlib.sha1(key.encode("utf-8", "surrogatepass")).hexdigest(), 16) % 1000 < val_fraction * 1000


def _sha1(obj) -> str:
    return hashlib.sha1(json.dumps(obj, sort_keys=True).encode()).hexdigest()


def _file_ids(root: Path, rels: list[str]) -> list:
    # size + mtime rather than a content hash: stat is free, hashing a large corpus is not
    return [(r, (root / r).stat().st_size, (root / r).stat().st_mtime_ns) for r in rels]


def _read_text(path: Path) -> str:
    return path.read_bytes().decode("utf-8", errors="replace")


def _check_val_fraction(val_fraction: float) -> None:
    if not 0 < val_fraction < 1:
        raise ValueError(f"data.val_fraction={val_fraction!r} must be in (0, 1)")


def _existing_path(path, source: str) -> Path:
    if path is None or str(path) == "":
        raise ValueError(f"data.path={path!r}: data.source={source!r} needs a file or directory")
    p = Path(path).expanduser()
    if not p.exists():
        raise ValueError(f"data.path={str(path)!r} does not exist")
    return p


class Corpus:
    """Base of text corpora: ``documents(split)`` yields str documents, deterministically ordered."""

    source: str = ""
    tokenized = False  # True for corpora that hold token ids, not text

    def documents(self, split: str) -> Iterator[str]:
        raise NotImplementedError

    def fingerprint(self) -> str:
        raise NotImplementedError


class FileCorpus(Corpus):
    """Files under ``root``, one document each, split by the hash of their relative path."""

    def __init__(self, source: str, root: Path, rels: list[str], val_fraction: float, where: str):
        _check_val_fraction(val_fraction)
        self.source, self.root, self.val_fraction = source, root, val_fraction
        self.splits = {"train": [], "val": []}
        for r in sorted(rels):
            self.splits["val" if is_val(r, val_fraction) else "train"].append(r)
        for split, files in self.splits.items():
            if not files:
                raise ValueError(f"data.val_fraction={val_fraction} leaves the {split} split of {where} empty "
                                 f"({len(rels)} files); change data.val_fraction or add files")

    def files(self, split: str) -> list[str]:
        return self.splits[split]

    def documents(self, split: str) -> Iterator[str]:
        for r in self.splits[split]:
            yield _read_text(self.root / r)

    def fingerprint(self) -> str:
        rels = self.splits["train"] + self.splits["val"]
        return _sha1([self.source, str(self.root.resolve()), self.val_fraction, _file_ids(self.root, sorted(rels))])


def stdlib_files(root: str | Path | None = None) -> list[str]:
    """Sorted relative paths (posix) of the stdlib's .py files, test suites and installed packages excluded."""
    root = Path(root or sysconfig.get_paths()["stdlib"])
    rels = []
    for d, dirs, files in os.walk(root):
        dirs[:] = [x for x in dirs if x not in STDLIB_EXCLUDE]  # prune: never descend into site-packages
        rel_dir = Path(d).relative_to(root)
        rels += [(rel_dir / f).as_posix() for f in files if f.endswith(".py")]
    return sorted(rels)


class StdlibCorpus(FileCorpus):
    """The running interpreter's standard library sources (~12 MB of Python): embedded, nothing to download."""

    def __init__(self, val_fraction: float = 0.05):
        root = Path(sysconfig.get_paths()["stdlib"])
        super().__init__("stdlib", root, stdlib_files(root), val_fraction, f"the stdlib at {str(root)!r}")


class TextFileCorpus(Corpus):
    """One text file: the last ``val_fraction`` of its lines (at least one) is val, the rest train.

    The split point is a line boundary, so the two splits share no line; each split is one document.
    """

    source = "text"

    def __init__(self, path: Path, val_fraction: float = 0.05):
        _check_val_fraction(val_fraction)
        self.path, self.val_fraction = path, val_fraction
        if path.stat().st_size == 0:
            raise ValueError(f"data.path={str(path)!r} is empty")

    def _split_point(self, lines: list[str]) -> int:
        if len(lines) < 2:
            raise ValueError(f"data.path={str(self.path)!r} has {len(lines)} line(s); a single file is split by "
                             f"lines and needs at least 2")
        return len(lines) - max(1, round(len(lines) * self.val_fraction))

    def documents(self, split: str) -> Iterator[str]:
        lines = _read_text(self.path).splitlines(keepends=True)
        cut = self._split_point(lines)
        yield "".join(lines[:cut] if split == "train" else lines[cut:])

    def fingerprint(self) -> str:
        st = self.path.stat()
        return _sha1(["text-file", str(self.path.resolve()), self.val_fraction, st.st_size, st.st_mtime_ns])


def text_corpus(path, pattern: str = "**/*.txt", val_fraction: float = 0.05) -> Corpus:
    p = _existing_path(path, "text")
    if p.is_file():
        return TextFileCorpus(p, val_fraction)
    rels = sorted(f.relative_to(p).as_posix() for f in p.glob(pattern) if f.is_file())
    if not rels:
        raise ValueError(f"data.pattern={pattern!r} matches no file under data.path={str(path)!r}")
    return FileCorpus("text", p, rels, val_fraction, f"data.path={str(path)!r}")


class HFDatasetCorpus(Corpus):
    """Local Hugging Face dataset files (.parquet / .jsonl / .arrow), one document per row's ``text_field``.

    Files whose name (or a parent folder's name) starts with ``train`` are train and with ``val``/``validation``
    are val; ``test*`` files are ignored. If only one split is present, its documents are split by the hash of
    their text (so exact duplicates never straddle the split).
    """

    source = "hf_dataset"

    def __init__(self, path, text_field: str = "text", val_fraction: float = 0.05):
        _check_val_fraction(val_fraction)
        p = _existing_path(path, "hf_dataset")
        self.path, self.text_field, self.val_fraction = p, text_field, val_fraction
        if p.is_file():
            root, rels = p.parent, [p.name]
        else:
            root, rels = p, sorted(f.relative_to(p).as_posix() for f in p.rglob("*") if f.is_file())
        rels = [r for r in rels if r.endswith(HF_EXTENSIONS)]
        if not rels:
            raise ValueError(f"data.path={str(path)!r} holds no {'/'.join(HF_EXTENSIONS)} file")
        self.root = root
        by_split = {"train": [], "val": [], "test": [], None: []}
        for r in rels:
            by_split[self._split_of(r)].append(r)
        if by_split["train"] and by_split["val"]:
            self.files, self.hash_split = {"train": by_split["train"], "val": by_split["val"]}, False
        else:  # one split (or none named): hash-split the documents of whatever is there, test files last resort
            pool = by_split["train"] or by_split["val"] or by_split[None] or by_split["test"]
            self.files, self.hash_split = {"train": pool, "val": pool}, True

    @staticmethod
    def _split_of(rel: str) -> str | None:
        for part in reversed(rel.lower().split("/")):  # the file name first, then its folders
            if part.startswith("train"):
                return "train"
            if part.startswith(("validation", "val")):
                return "val"
            if part.startswith("test"):
                return "test"
        return None

    def _rows(self, rel: str) -> Iterator[str]:
        path, key = self.root / rel, f"data.text_field={self.text_field!r}"
        if rel.endswith(".jsonl"):
            with open(path, encoding="utf-8") as f:
                for i, line in enumerate(f):
                    if line.strip():
                        row = json.loads(line)
                        if self.text_field not in row:
                            raise ValueError(f"{key} is not a field of line {i + 1} of {str(path)!r}; "
                                             f"fields: {', '.join(row)}")
                        yield row[self.text_field]
            return
        try:
            import pyarrow as pa
            import pyarrow.parquet as pq
        except ImportError:
            raise ValueError(f"data.source='hf_dataset' needs the 'pyarrow' package to read {rel!r}; "
                             f"pip install pyarrow") from None
        if rel.endswith(".parquet"):
            pf = pq.ParquetFile(path)
            names = pf.schema_arrow.names
            batches = pf.iter_batches(columns=[self.text_field]) if self.text_field in names else None
        else:  # .arrow: datasets' save_to_disk writes the IPC stream format, others write the file format
            try:
                reader = pa.ipc.open_stream(pa.memory_map(str(path)))
                names, batches = reader.schema.names, reader
            except pa.ArrowInvalid:
                reader = pa.ipc.open_file(pa.memory_map(str(path)))
                names = reader.schema.names
                batches = (reader.get_batch(i) for i in range(reader.num_record_batches))
        if self.text_field not in names:
            raise ValueError(f"{key} is not a column of {str(path)!r}; columns: {', '.join(names)}")
        for batch in batches:
            yield from batch.column(self.text_field).to_pylist()

    def documents(self, split: str) -> Iterator[str]:
        for rel in self.files[split]:
            for text in self._rows(rel):
                if not text:  # None or "": nothing to learn from
                    continue
                if not isinstance(text, str):
                    raise ValueError(f"data.text_field={self.text_field!r} holds a {type(text).__name__}, "
                                     f"not text, in {str(self.root / rel)!r}")
                if self.hash_split and is_val(text, self.val_fraction) != (split == "val"):
                    continue
                yield text

    def fingerprint(self) -> str:
        rels = sorted(set(self.files["train"]) | set(self.files["val"]))
        return _sha1(["hf_dataset", str(self.root.resolve()), self.text_field, self.val_fraction,
                      self.hash_split, self.files, _file_ids(self.root, rels)])


class BinCorpus:
    """Pre-tokenized ``train.bin`` / ``val.bin``: flat arrays of ``token_dtype`` ids (the nanoGPT format)."""

    source = "bin"
    tokenized = True

    def __init__(self, path, token_dtype: str = "uint16"):
        if token_dtype not in TOKEN_DTYPES:
            raise ValueError(f"data.token_dtype={token_dtype!r} is not known; known: {', '.join(TOKEN_DTYPES)}")
        self.path, self.dtype = _existing_path(path, "bin"), np.dtype(token_dtype)
        for split in SPLITS:
            f = self.file(split)
            if not f.is_file():
                raise ValueError(f"data.path={str(path)!r} has no {split}.bin")
            size = f.stat().st_size
            if size == 0:
                raise ValueError(f"data.path={str(path)!r}: {split}.bin is empty")
            if size % self.dtype.itemsize:
                raise ValueError(f"data.token_dtype={token_dtype!r} does not fit {str(f)!r}: "
                                 f"{size} bytes is not a multiple of {self.dtype.itemsize}")

    def file(self, split: str) -> Path:
        return self.path / f"{split}.bin"

    def tokens(self, split: str) -> np.memmap:
        return np.memmap(self.file(split), dtype=self.dtype, mode="r")

    def fingerprint(self) -> str:
        return _sha1(["bin", str(self.path.resolve()), self.dtype.name, _file_ids(self.path, ["train.bin", "val.bin"])])


def build_corpus(source: str = "stdlib", path=None, pattern: str = "**/*.txt", text_field: str = "text",
                 token_dtype: str = "uint16", val_fraction: float = 0.05) -> Corpus | BinCorpus:
    """The corpus named by ``data.source``; the other arguments are used by the sources that need them."""
    if source == "stdlib":
        return StdlibCorpus(val_fraction)
    if source == "text":
        return text_corpus(path, pattern, val_fraction)
    if source == "bin":
        return BinCorpus(path, token_dtype)
    if source == "hf_dataset":
        return HFDatasetCorpus(path, text_field, val_fraction)
    if source == "prepared":
        raise ValueError("data.source='prepared' is read by olm.data.prepared, not as a text corpus")
    raise ValueError(f"data.source={source!r} is not known; known: {', '.join(SOURCES)}")
