"""Reading prepared datasets (``olm data prepare``): their manifest, their shards as one token stream per split, and
the checks that run before training (one-line ``ValueError``s naming the ``data.*`` key).

Everything here reads only the manifests and the shards' sizes, never the tokens, so the checks are cheap enough to
run while a config is composed.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset

from .corpus import SPLITS
from .tokenizers import Tokenizer, load_tokenizer


def source_specs(sources, path) -> dict[str, tuple[str, float]]:
    """``data.sources`` as {name: (path, weight)}; without sources, ``data.path`` is one source named after its
    folder."""
    if sources:
        specs = {}
        for name, spec in sources.items():
            get = spec.get if isinstance(spec, dict) else lambda key, s=spec: getattr(s, key, None)
            specs[str(name)] = (get("path"), 1.0 if get("weight") is None else get("weight"))
        return specs
    if path:
        return {Path(str(path)).expanduser().resolve().name or "data": (str(path), 1.0)}
    raise ValueError("data.sources is empty: data.source='prepared' needs data.sources "
                     "({name: {path, weight}}) or data.path (one prepared folder)")


class PreparedSource:
    """One prepared folder: its manifest, checked against its shards' sizes."""

    def __init__(self, name: str, path, key: str):
        self.name, self.key = name, key
        if path is None or str(path) == "":
            raise ValueError(f"{key}={path!r}: a prepared source needs the folder written by olm data prepare")
        self.path = Path(str(path)).expanduser()
        if not self.path.exists():
            raise ValueError(f"{key}={str(path)!r} does not exist")
        manifest = self.path / "manifest.json"
        if not manifest.is_file():
            unfinished = " (an unfinished run: run the same olm data prepare again)" \
                if (self.path / "recipe.json").is_file() else ""
            raise ValueError(f"{key}={str(path)!r} holds no manifest.json, so it is not a prepared dataset"
                             f"{unfinished}")
        self.manifest = json.loads(manifest.read_text())
        if self.manifest.get("format") != "olm-prepared":
            raise ValueError(f"{key}={str(path)!r}: manifest.json was not written by olm data prepare")
        self.dtype = np.dtype(self.manifest["dtype"])
        tokenizer = self.manifest["tokenizer"]
        self.tokenizer_name, self.identity = tokenizer["name"], tokenizer["identity"]
        self.vocab_size = int(tokenizer["vocab_size"])
        for split in SPLITS:
            for shard in self.manifest["splits"][split]["shards"]:
                self._check_shard(shard)

    def _check_shard(self, shard: dict) -> None:
        f = self.path / shard["file"]
        if not f.is_file():
            raise ValueError(f"{self.key}={str(self.path)!r}: shard {shard['file']} is missing; prepare the "
                             "source again")
        size, width = f.stat().st_size, self.dtype.itemsize
        if size % width:
            raise ValueError(f"{self.key}={str(self.path)!r}: shard {shard['file']} is corrupt: {size} bytes is not "
                             f"a multiple of the {self.dtype.name} token width ({width} bytes)")
        if size != shard["num_tokens"] * width:
            raise ValueError(f"{self.key}={str(self.path)!r}: shard {shard['file']} is corrupt: "
                             f"{size // width} tokens, the manifest says {shard['num_tokens']}")

    def num_tokens(self, split: str) -> int:
        return int(self.manifest["splits"][split]["num_tokens"])

    def max_id(self, split: str) -> int:
        return int(self.manifest["splits"][split]["max_id"])

    def tokens(self, split: str) -> "TokenStream":
        shards = self.manifest["splits"][split]["shards"]
        return TokenStream([str(self.path / s["file"]) for s in shards], [s["num_tokens"] for s in shards],
                           self.dtype)

    def tokenizer(self) -> Tokenizer:
        return load_tokenizer(self.path / self.manifest["tokenizer"]["dir"])


def open_sources(sources, path, seq_len: int, tokenizer: Tokenizer | None = None) -> list[PreparedSource]:
    """The checked sources of ``data.sources`` (or ``data.path``): weights > 0, one tokenizer for all (and the same
    as ``tokenizer``, the one the config names, if any), at least one window of ``seq_len`` per split."""
    opened = []
    for name, (where, weight) in source_specs(sources, path).items():
        key = f"data.sources.{name}" if sources else "data"
        if isinstance(weight, bool) or not isinstance(weight, (int, float)) or not weight > 0:
            raise ValueError(f"{key}.weight={weight!r} must be a positive number")
        src = PreparedSource(name, where, f"{key}.path")
        src.weight = float(weight)
        for split in SPLITS:
            if src.num_tokens(split) < seq_len + 1:
                raise ValueError(f"{key}.path={str(where)!r}: its {split} split has {src.num_tokens(split)} tokens, "
                                 f"shorter than one sequence (data.seq_len={seq_len} needs {seq_len + 1})")
        first = opened[0] if opened else None
        if first is not None and src.identity != first.identity:
            raise ValueError(f"{src.key}={str(where)!r} was prepared with another tokenizer ({src.tokenizer_name} "
                             f"{src.identity}) than {first.key} ({first.tokenizer_name} {first.identity}); "
                             "prepare every source with one (olm data prepare --tokenizer-path <a prepared folder>)")
        if tokenizer is not None and src.identity != tokenizer.identity:
            raise ValueError(f"{src.key}={str(where)!r} was prepared with another tokenizer ({src.tokenizer_name} "
                             f"{src.identity}) than data.tokenizer_path names ({tokenizer.name} "
                             f"{tokenizer.identity}); leave data.tokenizer_path unset to use the data's own")
        opened.append(src)
    return opened


class TokenStream:
    """A split's shards as one flat token array, memory-mapped lazily (per worker, and again after unpickling)."""

    def __init__(self, files: list[str], counts: list[int], dtype: np.dtype):
        self.files, self.dtype = files, np.dtype(dtype)
        self.starts = np.concatenate([[0], np.cumsum(counts, dtype=np.int64)])  # token offset of each shard
        self.num_tokens = int(self.starts[-1])
        self._maps: dict[int, np.memmap] = {}

    def _shard(self, i: int) -> np.memmap:
        if i not in self._maps:
            self._maps[i] = np.memmap(self.files[i], dtype=self.dtype, mode="r")
        return self._maps[i]

    def read(self, start: int, n: int) -> np.ndarray:
        """Tokens ``[start, start + n)``, across shard boundaries."""
        i = int(np.searchsorted(self.starts, start, side="right")) - 1
        parts, end = [], start + n
        while start < end:
            lo = start - int(self.starts[i])
            take = min(end, int(self.starts[i + 1])) - start
            parts.append(self._shard(i)[lo:lo + take])
            start, i = start + take, i + 1
        return parts[0] if len(parts) == 1 else np.concatenate(parts)

    def __getstate__(self):
        return {**self.__dict__, "_maps": {}}


class StreamWindows(Dataset):
    """Window w of a token stream -> (input, target) int64 [seq_len], as olm's TokenWindows."""

    def __init__(self, stream: TokenStream, seq_len: int):
        self.stream, self.seq_len = stream, seq_len
        self.num_tokens = stream.num_tokens

    def __len__(self) -> int:
        return max(self.num_tokens - 1, 0) // self.seq_len

    def span(self, w: int) -> np.ndarray:
        return self.stream.read(w * self.seq_len, self.seq_len + 1)

    def __getitem__(self, w: int) -> tuple[torch.Tensor, torch.Tensor]:
        chunk = torch.from_numpy(self.span(w).astype(np.int64))  # [L+1]
        return chunk[:-1], chunk[1:]


def prepared_vocab_size(sources, path) -> int:
    """The vocabulary of the first source's tokenizer, from its manifest (what ``data.vocab_size`` defaults to)."""
    name, (where, _) = next(iter(source_specs(sources, path).items()))
    return PreparedSource(name, where, f"data.sources.{name}.path" if sources else "data.path").vocab_size
