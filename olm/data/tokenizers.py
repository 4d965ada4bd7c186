"""Tokenizers behind one small interface: ``encode``, ``decode``, ``encode_batch``, ``vocab_size``, ``eos_id``,
``name``.

- ``byte``: UTF-8 bytes, vocab 256, no eos. Needs nothing.
- ``bpe``: byte-level BPE trained with the ``tokenizers`` library on the train split only, cached on disk.
- ``hf``: a local Hugging Face ``tokenizer.json`` (or a folder holding one); never touches the network.

Each tokenizer also carries ``token_bytes``: for every id, the exact UTF-8 bytes it stands for (``b""`` for special
tokens), or None when that is not defined (a tokenizer that is not byte-level). It lets bits-per-byte count the bytes
of exactly the tokens evaluated. ``fingerprint`` identifies the tokenizer for caching token arrays.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Iterable, Iterator

import tokenizers as hf

TOKENIZERS = ("byte", "bpe", "hf")
EOS = "<|endoftext|>"
BPE_VERSION = 1  # bump when the BPE recipe below changes, so stale caches are not reused
EOS_CANDIDATES = (EOS, "</s>", "<eos>", "<|end_of_text|>", "<|im_end|>")


class Tokenizer:
    name: str
    vocab_size: int
    eos_id: int | None = None
    token_bytes: list[bytes] | None = None
    fingerprint: str

    def encode(self, text: str) -> list[int]:
        raise NotImplementedError

    def decode(self, ids: Iterable[int]) -> str:
        raise NotImplementedError

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        return [self.encode(t) for t in texts]

    def __repr__(self) -> str:
        return f"{type(self).__name__}(name={self.name!r}, vocab_size={self.vocab_size}, eos_id={self.eos_id})"

    def save(self, directory: str | os.PathLike) -> Path:
        """Write the tokenizer beside an exported model: ``tokenizer_meta.json`` (+ ``tokenizer.json``)."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        meta = {"name": self.name, "vocab_size": self.vocab_size}
        if isinstance(self, HFTokenizer):
            self.tok.save(str(directory / "tokenizer.json"))
            meta["eos_token"] = self.tok.id_to_token(self.eos_id) if self.eos_id is not None else None
        (directory / "tokenizer_meta.json").write_text(json.dumps(meta, indent=2) + "\n")
        return directory

    def save_for_transformers(self, directory: str | os.PathLike) -> Path:
        """Write ``tokenizer.json`` and ``tokenizer_config.json`` that ``transformers.AutoTokenizer`` loads as a
        fast tokenizer giving the same ids (beside a model exported with ``olm.zoo.to_hf``)."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        self.as_tokenizers().save(str(directory / "tokenizer.json"))
        eos = None if self.eos_id is None else self.as_tokenizers().id_to_token(self.eos_id)
        config = {"tokenizer_class": "PreTrainedTokenizerFast", "eos_token": eos, "bos_token": None,
                  "unk_token": None, "pad_token": None, "clean_up_tokenization_spaces": False,
                  "add_bos_token": False, "add_eos_token": False}
        (directory / "tokenizer_config.json").write_text(json.dumps(config, indent=2) + "\n")
        return directory

    def as_tokenizers(self) -> hf.Tokenizer:
        """The same tokenizer as a ``tokenizers.Tokenizer``."""
        raise NotImplementedError

    @property
    def identity(self) -> str:
        """A hash of what the tokenizer does (its ``tokenizers`` JSON and its eos id), not of its name or where it
        was loaded from: a BPE saved with prepared data and loaded back as ``hf`` is the same tokenizer."""
        spec = json.dumps([self.as_tokenizers().to_str(), self.eos_id])
        return hashlib.sha256(spec.encode()).hexdigest()[:16]


class ByteTokenizer(Tokenizer):
    """Token = one UTF-8 byte. Lossless for any text, so bytes per token is exactly 1."""

    name, vocab_size, fingerprint = "byte", 256, "byte"
    token_bytes = [bytes([i]) for i in range(256)]

    def encode(self, text: str) -> list[int]:
        return list(text.encode("utf-8"))

    def decode(self, ids: Iterable[int]) -> str:
        # a slice of a byte stream can cut a multi-byte character: show it as U+FFFD rather than fail
        return bytes(ids).decode("utf-8", errors="replace")

    def as_tokenizers(self) -> hf.Tokenizer:
        # Byte-level BPE without merges: every byte is its own token, and its id is the byte's value.
        tok = hf.Tokenizer(hf.models.BPE(vocab=byte_level_alphabet(), merges=[]))
        tok.pre_tokenizer = hf.pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
        tok.decoder = hf.decoders.ByteLevel()
        return tok


def byte_level_alphabet() -> dict[str, int]:
    """GPT-2's byte <-> printable-char map used by byte-level BPE, as char -> byte."""
    bs = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    cs, n = list(bs), 0
    for b in range(256):
        if b not in bs:  # unprintable bytes are shifted above 255
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return {chr(c): b for b, c in zip(bs, cs)}


class HFTokenizer(Tokenizer):
    """A ``tokenizers.Tokenizer`` behind the common interface (used by both ``bpe`` and ``hf``)."""

    def __init__(self, tok: hf.Tokenizer, name: str, vocab_size: int | None = None, eos_token: str | None = None):
        self.tok, self.name = tok, name
        # literal "<|endoftext|>" inside a document is text, not a document boundary
        tok.encode_special_tokens = True
        actual = tok.get_vocab_size(with_added_tokens=True)
        self.vocab_size = max(vocab_size or 0, actual)  # a requested size may exceed what training could fill
        self.eos_id = tok.token_to_id(eos_token) if eos_token else None
        self.fingerprint = f"{name}-" + hashlib.sha1(tok.to_str().encode()).hexdigest()
        self.token_bytes = self._token_bytes()

    def _token_bytes(self) -> list[bytes] | None:
        spec = json.loads(self.tok.to_str())
        decoders = [spec.get("decoder") or {}]
        decoders += decoders[0].get("decoders", [])  # a Sequence decoder
        if not any(d.get("type") == "ByteLevel" for d in decoders):
            return None
        alphabet = byte_level_alphabet()
        table = [b""] * self.vocab_size
        added = self.tok.get_added_tokens_decoder()
        for piece, i in self.tok.get_vocab(with_added_tokens=True).items():
            if i in added:  # special tokens stand for no text; other added tokens for their literal text
                table[i] = b"" if added[i].special else piece.encode("utf-8")
            elif all(c in alphabet for c in piece):
                table[i] = bytes(alphabet[c] for c in piece)
            else:
                return None
        return table

    def encode(self, text: str) -> list[int]:
        return self.tok.encode(text, add_special_tokens=False).ids

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        return [e.ids for e in self.tok.encode_batch_fast(texts, add_special_tokens=False)]

    def decode(self, ids: Iterable[int]) -> str:
        return self.tok.decode(list(ids), skip_special_tokens=False)

    def as_tokenizers(self) -> hf.Tokenizer:
        return self.tok

    def __getstate__(self):  # tokenizers objects pickle, but the JSON is the stable form
        return {**self.__dict__, "tok": self.tok.to_str()}

    def __setstate__(self, state):
        self.__dict__.update(state)
        self.tok = hf.Tokenizer.from_str(state["tok"])
        self.tok.encode_special_tokens = True


def split_pieces(doc: str, size: int) -> Iterator[str]:
    """``doc`` in pieces of about ``size`` chars, cut after a newline where there is one. Lossless: they concatenate
    back to ``doc``; only the tokens straddling a cut may differ from encoding the whole."""
    start = 0
    while len(doc) - start > size:
        cut = doc.rfind("\n", start, start + size) + 1
        cut = cut if cut > start else start + size
        yield doc[start:cut]
        start = cut
    yield doc[start:]


def train_bpe(texts: Iterable[str], vocab_size: int) -> hf.Tokenizer:
    """Byte-level BPE: every byte is in the base alphabet, so any text encodes and decode(encode(s)) == s."""
    tok = hf.Tokenizer(hf.models.BPE())
    tok.pre_tokenizer = hf.pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = hf.decoders.ByteLevel()
    trainer = hf.trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=[EOS], show_progress=False,
                                     initial_alphabet=hf.pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(texts, trainer)
    return tok


def default_cache_dir() -> str:
    """Where olm keeps tokenizers and tokenized corpora: $OLM_CACHE_DIR, else $XDG_CACHE_HOME/olm, else
    ~/.cache/olm; the same place whatever directory olm runs from."""
    if os.environ.get("OLM_CACHE_DIR"):
        return os.environ["OLM_CACHE_DIR"]
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(base, "olm")


def build_bpe(corpus, vocab_size: int = 4096, cache_dir: str | os.PathLike | None = None) -> HFTokenizer:
    """Train BPE on ``corpus``'s train split, or load it from ``cache_dir`` if this exact one was trained before.

    The cache key hashes the corpus fingerprint (source, files, sizes, mtimes, split), the vocab size and the recipe
    version. The returned tokenizer's ``trained`` flag says whether it was trained now.
    """
    if vocab_size < 257:
        raise ValueError(f"data.tokenizer_vocab_size={vocab_size} is too small for bpe: it needs at least 257 "
                         f"(256 bytes + {EOS})")
    key = hashlib.sha1(json.dumps([corpus.fingerprint(), vocab_size, BPE_VERSION]).encode()).hexdigest()[:16]
    path = Path(cache_dir or default_cache_dir()) / "tokenizers" / f"bpe-{vocab_size}-{key}.json"
    trained = not path.exists()
    if trained:
        tok = train_bpe(corpus.documents("train"), vocab_size)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(f".{os.getpid()}.tmp")  # atomic: concurrent ranks never read a half-written file
        tok.save(str(tmp))
        os.replace(tmp, path)
    else:
        tok = hf.Tokenizer.from_file(str(path))
    out = HFTokenizer(tok, "bpe", vocab_size, EOS)
    out.trained, out.path = trained, path
    return out


def load_hf(path) -> HFTokenizer:
    """A local tokenizer.json (or a folder with one). The eos token comes from tokenizer_config.json if present,
    else from common names; None if neither."""
    if path is None or str(path) == "":
        raise ValueError("data.tokenizer_path=None: the hf tokenizer needs a tokenizer.json or a folder holding one")
    p = Path(path).expanduser()
    file = p / "tokenizer.json" if p.is_dir() else p
    if not file.is_file():
        raise ValueError(f"data.tokenizer_path={str(path)!r} is not a tokenizer.json or a folder holding one")
    tok = hf.Tokenizer.from_file(str(file))
    eos, config = None, file.parent / "tokenizer_config.json"
    if config.is_file():
        eos = json.loads(config.read_text()).get("eos_token")
        eos = eos.get("content") if isinstance(eos, dict) else eos
    if eos is None or tok.token_to_id(eos) is None:
        eos = next((t for t in EOS_CANDIDATES if tok.token_to_id(t) is not None), None)
    return HFTokenizer(tok, "hf", eos_token=eos)


def load_tokenizer(directory: str | os.PathLike) -> Tokenizer:
    """Read a tokenizer written by ``Tokenizer.save``."""
    directory = Path(directory)
    meta_file = directory / "tokenizer_meta.json"
    if not meta_file.is_file():
        raise ValueError(f"{meta_file} does not exist; expected a directory written by Tokenizer.save")
    meta = json.loads(meta_file.read_text())
    if meta["name"] == "byte":
        return ByteTokenizer()
    tok = hf.Tokenizer.from_file(str(directory / "tokenizer.json"))
    return HFTokenizer(tok, meta["name"], meta.get("vocab_size"), meta.get("eos_token"))


def build_tokenizer(name: str = "byte", *, corpus=None, vocab_size: int = 4096, path=None,
                    cache_dir: str | os.PathLike | None = None) -> Tokenizer:
    """The tokenizer named by ``data.tokenizer``. ``corpus`` and ``vocab_size`` are for bpe, ``path`` for hf."""
    if name == "byte":
        return ByteTokenizer()
    if name == "bpe":
        if corpus is None or getattr(corpus, "tokenized", False):
            raise ValueError("data.tokenizer='bpe' needs a text source to train on (not data.source='bin')")
        return build_bpe(corpus, vocab_size, cache_dir)
    if name == "hf":
        return load_hf(path)
    raise ValueError(f"data.tokenizer={name!r} is not known; known: {', '.join(TOKENIZERS)}")


def known_vocab_size(source: str | None, tokenizer: str | None, tokenizer_vocab_size: int | None,
                     tokenizer_path: str | None) -> int:
    """The vocabulary size ``data.tokenizer`` will have, known without reading the corpus: 256 for byte,
    ``data.tokenizer_vocab_size`` for bpe (olm's BPE has exactly that many ids), the size of the tokenizer.json for
    hf. A ValueError names the key to set when the size cannot be known (a bin source without an hf tokenizer)."""
    if tokenizer == "hf":
        return load_hf(tokenizer_path).vocab_size
    if source == "bin":
        raise ValueError("data.vocab_size must be set for data.source='bin' (its token ids are read as they are), "
                         "e.g. data.vocab_size=50304")
    if tokenizer == "byte":
        return ByteTokenizer.vocab_size
    if tokenizer == "bpe":
        return tokenizer_vocab_size
    raise ValueError(f"data.tokenizer={tokenizer!r} is not known; known: {', '.join(TOKENIZERS)}")
