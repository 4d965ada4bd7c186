"""olm.data: splits, tokenizers, caching, sampling/sharding/resume, statistics, errors. Tiny synthetic corpora."""

import bz2
import gzip
import json
import lzma
import math
import os
import pickle
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from olm.data import (SEPARATOR, BinCorpus, ByteTokenizer, HFDatasetCorpus, StdlibCorpus, TextDataModule,
                      TokenWindows, WindowBatchSampler, build_corpus, build_tokenizer, is_val, stdlib_files,
                      tokenize_documents)
from olm.data import datamodule as dm_module
from olm.data.corpus import STDLIB_EXCLUDE

WORDS = "the quick brown fox jumps over a lazy dog while seven wizards quietly hex jovial boxers".split()


def make_doc(i: int, n_words: int = 200) -> str:
    rng = np.random.default_rng(i)
    lines = [" ".join(rng.choice(WORDS, 10)) for _ in range(n_words // 10)]
    return f"# doc {i} — ünïcødé ✓\n" + "\n".join(lines) + "\n"


@pytest.fixture
def text_dir(tmp_path) -> Path:
    root = tmp_path / "corpus"
    for i in range(40):
        f = root / f"d{i % 3}" / f"f{i}.txt"
        f.parent.mkdir(parents=True, exist_ok=True)
        f.write_text(make_doc(i))
    (root / "ignored.md").write_text("not matched by the pattern")
    return root


def text_dm(text_dir, tmp_path, **kw) -> TextDataModule:
    args = dict(source="text", path=str(text_dir), val_fraction=0.2, seq_len=16, batch_size=4,
                cache_dir=str(tmp_path / "cache"))
    return TextDataModule(**{**args, **kw})


def one_line_error(fn, *match):
    with pytest.raises(ValueError) as e:
        fn()
    msg = str(e.value)
    assert "\n" not in msg
    for m in match:
        assert m in msg, msg
    return msg


# ---- corpora and splits


def test_stdlib_split_is_deterministic_and_disjoint():
    a, b = StdlibCorpus(0.05), StdlibCorpus(0.05)
    assert a.files("train") == b.files("train") and a.files("val") == b.files("val")
    train, val = set(a.files("train")), set(a.files("val"))
    assert not train & val
    assert train | val == set(stdlib_files())
    assert all(is_val(r, 0.05) for r in val) and not any(is_val(r, 0.05) for r in train)
    assert 0.02 < len(val) / (len(train) + len(val)) < 0.09
    assert a.fingerprint() == b.fingerprint() != StdlibCorpus(0.1).fingerprint()


def test_stdlib_excludes_tests_and_installed_packages(tmp_path):
    rels = stdlib_files()
    assert "os.py" in rels and "json/__init__.py" in rels
    assert not any(set(r.split("/")[:-1]) & STDLIB_EXCLUDE for r in rels)
    for r in ["a.py", "pkg/b.py", "idlelib/c.py", "test/t.py", "pkg/tests/t.py", "idlelib/idle_test/t.py",
              "site-packages/x/y.py", "dist-packages/z.py", "pkg/__pycache__/b.py", "pkg/data.txt"]:
        (tmp_path / r).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / r).write_text("x = 1\n")
    assert stdlib_files(tmp_path) == ["a.py", "idlelib/c.py", "pkg/b.py"]


def test_text_dir_split_by_path_hash_is_stable(text_dir):
    c = build_corpus("text", text_dir, val_fraction=0.2)
    train, val = c.files("train"), c.files("val")
    assert not set(train) & set(val) and len(train) + len(val) == 40  # ignored.md is not *.txt
    assert all(is_val(r, 0.2) for r in val)
    assert list(c.documents("val")) == [(text_dir / r).read_text() for r in val]
    (text_dir / "new.txt").write_text("a new file moves no other file across the split")
    c2 = build_corpus("text", text_dir, val_fraction=0.2)
    assert set(c2.files("val")) - {"new.txt"} == set(val)
    assert c2.fingerprint() != c.fingerprint()


def test_single_text_file_splits_at_a_line(tmp_path):
    f = tmp_path / "book.txt"
    lines = [f"line {i}\n" for i in range(100)]
    f.write_text("".join(lines))
    c = build_corpus("text", f, val_fraction=0.1)
    (train,), (val,) = c.documents("train"), c.documents("val")
    assert train == "".join(lines[:90]) and val == "".join(lines[90:])


def test_hf_dataset_jsonl(tmp_path):
    d = tmp_path / "ds"
    d.mkdir()
    rows = lambda xs: "".join(json.dumps({"text": x, "id": i}) + "\n" for i, x in enumerate(xs))
    (d / "train.jsonl").write_text(rows(["alpha", "beta", "", "gamma"]))
    (d / "validation.jsonl").write_text(rows(["delta"]))
    (d / "test.jsonl").write_text(rows(["never read"]))
    c = build_corpus("hf_dataset", d)
    assert list(c.documents("train")) == ["alpha", "beta", "gamma"] and list(c.documents("val")) == ["delta"]
    # one split only: documents are hash-split by their text
    (d / "validation.jsonl").unlink()
    (d / "test.jsonl").unlink()
    docs = [f"document number {i}" for i in range(200)]
    (d / "train.jsonl").write_text(rows(docs))
    c = build_corpus("hf_dataset", d, val_fraction=0.2)
    train, val = list(c.documents("train")), list(c.documents("val"))
    assert sorted(train + val) == sorted(docs) and not set(train) & set(val)
    assert val == [x for x in docs if is_val(x, 0.2)] and 20 < len(val) < 60
    one_line_error(lambda: list(build_corpus("hf_dataset", d, text_field="body").documents("train")),
                   "data.text_field='body'", "train.jsonl")


def test_hf_dataset_parquet_and_arrow(tmp_path):
    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq
    d = tmp_path / "ds"
    (d / "data").mkdir(parents=True)
    pq.write_table(pa.table({"content": ["one", "two"], "n": [1, 2]}), d / "data" / "train-00000-of-00001.parquet")
    (d / "validation").mkdir()
    table = pa.table({"content": ["three"]})
    with pa.ipc.new_stream(str(d / "validation" / "data-00000-of-00001.arrow"), table.schema) as w:  # save_to_disk
        w.write_table(table)
    c = HFDatasetCorpus(d, text_field="content")
    assert list(c.documents("train")) == ["one", "two"] and list(c.documents("val")) == ["three"]
    one_line_error(lambda: list(HFDatasetCorpus(d).documents("train")), "data.text_field='text'", "columns: content")


# ---- tokenizers


def test_byte_tokenizer_roundtrip():
    tok = build_tokenizer("byte")
    s = "héllo ✓ 🚀\n\tx"
    assert tok.encode(s) == list(s.encode()) and tok.decode(tok.encode(s)) == s
    assert tok.vocab_size == 256 and tok.eos_id is None


def test_bpe_roundtrip_and_cache_reuse(text_dir, tmp_path):
    corpus = build_corpus("text", text_dir, val_fraction=0.2)
    cache = tmp_path / "cache"
    tok = build_tokenizer("bpe", corpus=corpus, vocab_size=320, cache_dir=cache)
    assert tok.trained and tok.path.exists() and tok.vocab_size == 320 and tok.eos_id == 0
    mtime = tok.path.stat().st_mtime_ns
    again = build_tokenizer("bpe", corpus=corpus, vocab_size=320, cache_dir=cache)
    assert not again.trained and again.path == tok.path and tok.path.stat().st_mtime_ns == mtime
    tricky = ["  leading spaces, ünïcødé, 🚀 emoji,\ttabs\r\n", "literal <|endoftext|> is text", ""]
    for s in [make_doc(999), *tricky]:
        ids = again.encode(s)
        assert again.decode(ids) == s and tok.encode(s) == ids
        assert 0 not in ids  # eos only ever marks document boundaries
    assert len(again.encode(make_doc(999))) < len(make_doc(999).encode())  # it does compress
    # a different vocab size or a changed corpus is a different tokenizer
    assert build_tokenizer("bpe", corpus=corpus, vocab_size=300, cache_dir=cache).trained
    (text_dir / "d0" / "f0.txt").write_text("changed")
    assert build_tokenizer("bpe", corpus=build_corpus("text", text_dir, val_fraction=0.2), vocab_size=320,
                           cache_dir=cache).trained


def test_hf_tokenizer_from_local_file(text_dir, tmp_path):
    bpe = build_tokenizer("bpe", corpus=build_corpus("text", text_dir, val_fraction=0.2), vocab_size=300,
                          cache_dir=tmp_path / "cache")
    d = tmp_path / "tok"
    d.mkdir()
    bpe.tok.save(str(d / "tokenizer.json"))
    tok = build_tokenizer("hf", path=d)
    s = make_doc(5)
    assert tok.encode(s) == bpe.encode(s) and tok.decode(tok.encode(s)) == s
    assert tok.eos_id == 0 and tok.token_bytes == bpe.token_bytes
    one_line_error(lambda: build_tokenizer("hf", path=tmp_path / "nope"), "data.tokenizer_path=")
    one_line_error(lambda: build_tokenizer("hf"), "data.tokenizer_path=None")


def test_long_documents_are_encoded_in_lossless_pieces(monkeypatch, text_dir, tmp_path):
    monkeypatch.setattr(dm_module, "PIECE_CHARS", 50)
    monkeypatch.setattr(dm_module, "CHUNK_CHARS", 120)
    docs = [make_doc(1), "", make_doc(2), "x" * 130]
    bpe = build_tokenizer("bpe", corpus=build_corpus("text", text_dir, val_fraction=0.2), vocab_size=300,
                          cache_dir=tmp_path / "cache")
    ids = np.concatenate(list(tokenize_documents(docs, bpe)))
    assert bpe.decode(ids.tolist()) == "<|endoftext|>".join(d for d in docs if d)
    ids = np.concatenate(list(tokenize_documents(docs, ByteTokenizer())))
    assert ids.tobytes() == SEPARATOR.join(d for d in docs if d).encode()


# ---- windows and the sampler


def test_windows_target_is_input_shifted(tmp_path):
    tokens = np.arange(1000, dtype=np.uint16) % 251
    tokens.tofile(tmp_path / "t.bin")
    ds = TokenWindows(tmp_path / "t.bin", "uint16", seq_len=32)
    assert len(ds) == 999 // 32
    for w in [0, 5, len(ds) - 1]:
        x, y = ds[w]
        assert x.dtype == y.dtype == torch.int64 and x.shape == y.shape == (32,)
        assert torch.equal(x, torch.from_numpy(tokens[w * 32: w * 32 + 32].astype(np.int64)))
        assert torch.equal(y, torch.from_numpy(tokens[w * 32 + 1: w * 32 + 33].astype(np.int64)))
    assert pickle.loads(pickle.dumps(ds))._tokens is None  # no open file in a pickle


def take(sampler, n):
    it = iter(sampler)
    return [next(it) for _ in range(n)]


def test_sampler_epochs_are_seeded_permutations():
    n = 37
    s = WindowBatchSampler(n, batch_size=5, seed=3)
    windows = [s.window(g) for g in range(3 * n)]
    for e in range(3):
        assert windows[e * n:(e + 1) * n] == np.random.default_rng([3, e]).permutation(n).tolist()
    flat = sum(take(WindowBatchSampler(n, 5, seed=3), 10), [])
    assert flat == windows[:50]
    assert take(WindowBatchSampler(n, 5, seed=4), 3) != take(s, 3)


def test_ddp_shards_are_disjoint_and_union_is_single_process_batch():
    n, B, W = 50, 3, 2
    single = WindowBatchSampler(n, B * W, seed=1)
    ranks = [WindowBatchSampler(n, B, seed=1, rank=r, world_size=W) for r in range(W)]
    for b in range(40):  # 40 * 6 samples: several epochs
        idx = [set(s.global_indices(b)) for s in ranks]
        assert not idx[0] & idx[1]
        assert idx[0] | idx[1] == set(single.global_indices(b))
    batches = [take(s, 40) for s in ranks]
    assert [r0 + r1 for r0, r1 in zip(*batches)] == take(single, 40)


def test_resume_continues_where_it_stopped():
    full = take(WindowBatchSampler(23, 4, seed=0, rank=1, world_size=3), 30)
    assert take(WindowBatchSampler(23, 4, seed=0, rank=1, world_size=3, start_batch=11), 19) == full[11:]
    # a finite sampler iterated twice (two Lightning epochs) continues instead of repeating
    s = WindowBatchSampler(23, 4, seed=0, rank=1, world_size=3, num_batches=10)
    assert len(s) == 10 and list(s) + list(s) == full[:20]


# ---- the datamodule


def test_datamodule_byte_stats_and_batches(text_dir, tmp_path):
    dm = text_dm(text_dir, tmp_path)
    dm.setup()
    corpus = dm.corpus
    val_text = SEPARATOR.join(corpus.documents("val")).encode()
    train_text = SEPARATOR.join(corpus.documents("train")).encode()
    assert dm.vocab_size == 256 and dm.num_val_tokens == len(val_text) and dm.num_train_tokens == len(train_text)
    assert np.array_equal(dm._val.tokens, np.frombuffer(val_text, np.uint8))
    assert dm._val.tokens.dtype == np.uint16
    # all val windows, byte tokenizer: bytes per token is exactly 1 and the text is the evaluated targets
    n = dm.num_val_windows()
    assert n == (len(val_text) - 1) // 16
    text, tokens = dm.val_text()
    assert text == val_text[1:n * 16 + 1] and tokens == n * 16
    assert dm.val_bytes_per_token == 1.0
    assert dm.gzip_bits_per_byte() == 8 * len(gzip.compress(text, 9)) / len(text)
    assert 0.5 < dm.gzip_bits_per_byte() < 4  # repetitive synthetic text compresses well
    # the reference compressors, each at its strongest setting, against the standard library's own
    assert dm.compressor_bits_per_byte() == {
        "gzip": 8 * len(gzip.compress(text, 9)) / len(text), "bz2": 8 * len(bz2.compress(text, 9)) / len(text),
        "xz": 8 * len(lzma.compress(text, preset=9 | lzma.PRESET_EXTREME)) / len(text)}
    assert dm.bits_per_byte(math.log(2)) == 1.0
    x, y = next(iter(dm.train_dataloader()))
    assert x.shape == y.shape == (4, 16) and torch.equal(x[:, 1:], y[:, :-1])
    assert sum(len(b[0]) for b in dm.val_dataloader()) == n


def test_datamodule_bpe_stats(text_dir, tmp_path):
    dm = text_dm(text_dir, tmp_path, tokenizer="bpe", tokenizer_vocab_size=400, val_batches=2)
    tok = dm.tokenizer
    val_docs = list(dm.corpus.documents("val"))
    dm.setup()
    assert dm.vocab_size == 400 and tok.decode(dm._val.tokens.tolist()) == "<|endoftext|>".join(val_docs)
    n = dm.num_val_windows()
    assert n == 2 * 4
    text, tokens = dm.val_text()
    span = dm._val.tokens[1:n * 16 + 1].tolist()
    assert tokens == n * 16 and text == tok.decode(span).replace("<|endoftext|>", "").encode()
    assert dm.val_bytes_per_token == len(text) / tokens > 1.5
    assert dm.gzip_bits_per_byte() == 8 * len(gzip.compress(text, 9)) / len(text)


def test_token_cache_is_reused(text_dir, tmp_path):
    dm = text_dm(text_dir, tmp_path)
    dm.setup()
    mtime = os.stat(dm._train.path).st_mtime_ns
    dm2 = text_dm(text_dir, tmp_path)
    dm2.setup()
    assert dm2._train.path == dm._train.path and os.stat(dm2._train.path).st_mtime_ns == mtime


def test_datamodule_reads_rank_and_resume_position_from_trainer(text_dir, tmp_path):
    def loader(batch_size, world, rank, step=0, accum=1, max_steps=6):
        dm = text_dm(text_dir, tmp_path, batch_size=batch_size)
        dm.trainer = SimpleNamespace(global_rank=rank, world_size=world, global_step=step,
                                     accumulate_grad_batches=accum, max_steps=max_steps)
        return dm, list(dm.train_dataloader())

    _, single = loader(2, 1, 0)
    _, r0 = loader(1, 2, 0)
    _, r1 = loader(1, 2, 1)
    assert len(single) == len(r0) == len(r1) == 6  # max_steps * accumulate_grad_batches
    for (x0, y0), (x1, y1), (x, y) in zip(r0, r1, single):
        assert torch.equal(torch.cat([x0, x1]), x) and torch.equal(torch.cat([y0, y1]), y)
    # resumed after 2 optimizer steps of 2 micro-batches each: micro-batches 4..9 of a 5-step run
    dm, resumed = loader(2, 1, 0, step=2, accum=2, max_steps=5)
    assert dm.start_batch() == 4 and len(resumed) == 6
    expected = take(WindowBatchSampler(len(dm._train), 2), 10)[4:]
    assert [x.tolist() for x, _ in resumed] == [[dm._train[w][0].tolist() for w in b] for b in expected]
    dm = text_dm(text_dir, tmp_path, batch_size=2)
    dm.consumed_batches = 7
    assert dm.train_sampler().start_batch == 7 and len(dm.train_sampler()) == dm_module.INFINITE


def test_val_is_sharded_contiguously(text_dir, tmp_path):
    def val_windows(world, rank, val_batches=None):
        dm = text_dm(text_dir, tmp_path, batch_size=3, val_batches=val_batches)
        dm.trainer = SimpleNamespace(global_rank=rank, world_size=world)
        return dm, [x for x, _ in dm.val_dataloader()]

    dm, single = val_windows(1, 0)
    all_windows = torch.cat(single)
    assert len(all_windows) == len(dm._val)
    dm0, r0 = val_windows(2, 0)
    _, r1 = val_windows(2, 1)
    n = dm0.num_val_windows()
    assert n == len(dm._val) - len(dm._val) % 2
    assert torch.equal(torch.cat(r0 + r1), all_windows[:n])
    assert len(torch.cat(r0)) == len(torch.cat(r1)) == n // 2
    _, limited = val_windows(2, 1, val_batches=2)
    assert torch.equal(torch.cat(limited), all_windows[6:12])


def test_datamodule_pickles_without_open_files(text_dir, tmp_path):
    dm = text_dm(text_dir, tmp_path, num_workers=2)
    expected = [x for x, _ in take_loader(text_dm(text_dir, tmp_path).train_dataloader(), 3)]
    assert dm.val_bytes_per_token == 1.0  # opens the val memmap
    dm2 = pickle.loads(pickle.dumps(dm))
    assert dm2._val._tokens is None and dm2._train._tokens is None
    got = [x for x, _ in take_loader(dm2.train_dataloader(), 3)]  # worker processes reopen the memmaps
    assert all(torch.equal(a, b) for a, b in zip(got, expected))


def take_loader(loader, n):
    it = iter(loader)
    return [next(it) for _ in range(n)]


@pytest.mark.parametrize("dtype", ["uint16", "uint32"])
def test_bin_source_memmaps(tmp_path, dtype):
    high = 70000 if dtype == "uint32" else 60000
    rng = np.random.default_rng(0)
    train, val = rng.integers(0, high, 5000).astype(dtype), rng.integers(0, high, 700).astype(dtype)
    train.tofile(tmp_path / "train.bin")
    val.tofile(tmp_path / "val.bin")
    dm = TextDataModule(source="bin", path=str(tmp_path), token_dtype=dtype, vocab_size=high, seq_len=64,
                        batch_size=2, cache_dir=str(tmp_path / "cache"))
    dm.setup()
    assert isinstance(dm._train.tokens, np.memmap) and dm._train.tokens.dtype == dtype
    assert dm.num_train_tokens == 5000 and dm.num_val_tokens == 700 and dm.vocab_size == high
    x, y = dm._train[3]
    assert x.tolist() == train[192:256].tolist() and y.tolist() == train[193:257].tolist()
    assert dm.tokenizer is None and dm.val_bytes_per_token is None and dm.gzip_bits_per_byte() is None
    too_small = TextDataModule(source="bin", path=str(tmp_path), token_dtype=dtype, vocab_size=1000,
                               cache_dir=str(tmp_path / "cache"))
    one_line_error(too_small.setup, "data.vocab_size=1000", f"token id {int(train.max())}")
    no_vocab = TextDataModule(source="bin", path=str(tmp_path), token_dtype=dtype, cache_dir=str(tmp_path / "cache"))
    one_line_error(no_vocab.setup, "data.vocab_size=None")


def test_errors_are_one_line_and_name_the_key(tmp_path, text_dir):
    def dm(**kw):
        return TextDataModule(cache_dir=str(tmp_path / "cache"), **kw).setup()

    one_line_error(lambda: dm(source="foo"), "data.source='foo'", "known: stdlib, text, bin, hf_dataset")
    one_line_error(lambda: dm(source="text", path=str(tmp_path / "x")), "data.path=", "does not exist")
    one_line_error(lambda: dm(source="text"), "data.path=None")
    one_line_error(lambda: dm(source="bin", path=""), "data.path=''")
    (tmp_path / "empty").mkdir()
    one_line_error(lambda: dm(source="text", path=str(tmp_path / "empty")), "data.pattern='**/*.txt'")
    one_line_error(lambda: dm(source="hf_dataset", path=str(tmp_path / "empty")), "data.path=", ".jsonl")
    one_line_error(lambda: dm(source="bin", path=str(tmp_path / "empty")), "data.path=", "train.bin")
    (tmp_path / "empty.txt").write_text("")
    one_line_error(lambda: dm(source="text", path=str(tmp_path / "empty.txt")), "data.path=", "is empty")
    (tmp_path / "few").mkdir()
    for name in ["a.txt", "b.txt"]:
        (tmp_path / "few" / name).write_text("some text")
        assert not is_val(name, 0.01)
    one_line_error(lambda: dm(source="text", path=str(tmp_path / "few"), val_fraction=0.01),
                   "data.val_fraction=0.01", "val split", "empty")
    one_line_error(lambda: dm(source="text", path=str(text_dir), val_fraction=1.5), "data.val_fraction=1.5")
    one_line_error(lambda: dm(source="text", path=str(text_dir), val_fraction=0.2, tokenizer="wordpiece"),
                   "data.tokenizer='wordpiece'", "known: byte, bpe, hf")
    one_line_error(lambda: dm(source="text", path=str(text_dir), val_fraction=0.2, seq_len=10**6),
                   "data.seq_len=1000000", "val split has")
    one_line_error(lambda: dm(source="text", path=str(text_dir), val_fraction=0.2, vocab_size=100),
                   "data.vocab_size=100")
    one_line_error(lambda: dm(seq_len=0), "data.seq_len=0")
    (tmp_path / "odd").mkdir()
    (tmp_path / "odd" / "train.bin").write_bytes(b"\0" * 6)
    (tmp_path / "odd" / "val.bin").write_bytes(b"\0" * 6)
    one_line_error(lambda: BinCorpus(tmp_path / "odd", "uint32"), "data.token_dtype='uint32'")
    one_line_error(lambda: BinCorpus(tmp_path / "odd", "int8"), "data.token_dtype='int8'", "known: uint16, uint32")
