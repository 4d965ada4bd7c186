"""`olm data prepare`: token totals against a direct count, shards, resume after a crash, the manifest and the saved
tokenizer, one-line errors. Tiny generated corpora."""

import json
from pathlib import Path

import numpy as np
import pytest

from olm.data import build_corpus, build_tokenizer, load_tokenizer
from olm.data import prepare as prepare_module
from olm.data.prepare import SEPARATOR, prepare
from olm.data.prepared import PreparedSource, open_sources

WORDS = "alpha beta gamma delta epsilon zeta eta theta iota kappa lambda mu".split()


def make_text(i: int, words: int) -> str:
    rng = np.random.default_rng(i)
    return " ".join(rng.choice(WORDS, words)) + f" — {i} ✓\n"


@pytest.fixture(scope="module")
def sources(tmp_path_factory) -> dict[str, Path]:
    """Two generated sources: a folder of text files and a JSONL file (one document per row, two of them empty)."""
    root = tmp_path_factory.mktemp("sources")
    for i in range(30):
        (root / "prose" / f"d{i % 2}").mkdir(parents=True, exist_ok=True)
        (root / "prose" / f"d{i % 2}" / f"{i}.txt").write_text(make_text(i, 40 + 7 * i))
    rows = [{"text": make_text(100 + i, 15 + i) if i % 17 else ""} for i in range(60)]
    (root / "code.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return {"prose": root / "prose", "code": root / "code.jsonl"}


def shard_tokens(out: Path, split: str) -> np.ndarray:
    manifest = json.loads((out / "manifest.json").read_text())
    dtype = np.dtype(manifest["dtype"])
    return np.concatenate([np.fromfile(out / s["file"], dtype) for s in manifest["splits"][split]["shards"]])


def test_token_totals_equal_a_direct_count_with_the_same_tokenizer(sources, tmp_path):
    """Both sources, byte and BPE, one process and a pool of two: the shards hold exactly each document's tokens
    followed by the separator, in input order, and the manifest counts them."""
    fmt = {"prose": "text", "code": "hf_dataset"}
    for name, path in sources.items():
        corpus = build_corpus(fmt[name], path, val_fraction=0.2)
        bpe = build_tokenizer("bpe", corpus=corpus, vocab_size=300, cache_dir=tmp_path / "cache")
        for tok, workers in ((build_tokenizer("byte"), 1), (bpe, 2)):
            out = tmp_path / f"{name}-{tok.name}"
            manifest = prepare(path, out, tokenizer=tok.name, vocab_size=300, val_fraction=0.2, shard_tokens=700,
                               workers=workers, cache_dir=tmp_path / "cache", progress=False)
            sep = [tok.eos_id] if tok.eos_id is not None else tok.encode(SEPARATOR)
            for split in ("train", "val"):
                docs = [d for d in corpus.documents(split) if d]
                direct = np.array([t for d in docs for t in [*tok.encode(d), *sep]])
                stats = manifest["splits"][split]
                assert stats["num_tokens"] == len(direct) and stats["num_documents"] == len(docs)
                assert np.array_equal(shard_tokens(out, split), direct)
                assert stats["num_bytes"] == sum(len(d.encode()) for d in docs) + (len(sep) if tok.eos_id is None
                                                                                   else 0) * len(docs)
                if split == "train":  # each shard closed at the first document end past 700 tokens
                    sizes = [s["num_tokens"] for s in stats["shards"]]
                    assert len(sizes) > 2 and all(s >= 700 for s in sizes[:-1])
            assert manifest["dtype"] == "uint16" and manifest["tokenizer"]["identity"] == tok.identity
            assert load_tokenizer(out / "tokenizer").identity == tok.identity  # the tokenizer travels
            read_back = PreparedSource(name, out, "data.path")
            assert read_back.num_tokens("train") == manifest["splits"]["train"]["num_tokens"]
    # the same rows as Parquet give the same tokens
    import pyarrow as pa
    import pyarrow.parquet as pq

    rows = [json.loads(line) for line in sources["code"].read_text().splitlines()]
    pq.write_table(pa.table({"text": [r["text"] for r in rows]}), tmp_path / "code.parquet")
    prepare(tmp_path / "code.parquet", tmp_path / "parquet", val_fraction=0.2, workers=1, progress=False)
    for split in ("train", "val"):
        assert np.array_equal(shard_tokens(tmp_path / "parquet", split), shard_tokens(tmp_path / "code-byte", split))


def test_a_crashed_prepare_resumes_keeping_finished_shards_and_equals_an_uninterrupted_one(sources, tmp_path,
                                                                                            monkeypatch):
    args = dict(tokenizer="byte", val_fraction=0.2, shard_tokens=300, workers=1, progress=False)
    whole = tmp_path / "whole"
    prepare(sources["prose"], whole, **args)

    crashed = tmp_path / "crashed"
    close = prepare_module.ShardWriter._close
    calls = {"n": 0}

    def crash_after_three(self):
        close(self)
        calls["n"] += 1
        if calls["n"] == 3:
            raise KeyboardInterrupt  # as a kill leaves it: three shards done, the fourth half-written

    monkeypatch.setattr(prepare_module.ShardWriter, "_close", crash_after_three)
    with pytest.raises(KeyboardInterrupt):
        prepare(sources["prose"], crashed, **args)
    monkeypatch.undo()
    assert not (crashed / "manifest.json").exists()
    done = {p.name: p.stat().st_mtime_ns for p in (crashed / "train").glob("shard_*.bin")}
    assert sorted(done) == ["shard_00000.bin", "shard_00001.bin", "shard_00002.bin"]
    (crashed / "train" / ".shard_00003.bin.12345.tmp").write_bytes(b"\1" * 99)  # as a kill mid-shard leaves it

    with pytest.raises(ValueError, match="other settings: shard_tokens=300"):
        prepare(sources["prose"], crashed, **{**args, "shard_tokens": 400})
    manifest = prepare(sources["prose"], crashed, **args)
    assert {n: (crashed / "train" / n).stat().st_mtime_ns for n in done} == done  # kept, not rewritten
    assert not list(crashed.rglob("*.tmp"))
    expected = json.loads((whole / "manifest.json").read_text())
    for split in ("train", "val"):
        assert np.array_equal(shard_tokens(crashed, split), shard_tokens(whole, split))
        assert manifest["splits"][split]["shards"] == expected["splits"][split]["shards"]
    with pytest.raises(ValueError, match="already holds a prepared dataset"):
        prepare(sources["prose"], crashed, **args)


def one_line(exc_info) -> str:
    msg = str(exc_info.value)
    assert "\n" not in msg
    return msg


def test_bad_data_is_one_line_naming_the_key(sources, tmp_path):
    prose, code = tmp_path / "prose", tmp_path / "code"
    prepare(sources["prose"], prose, tokenizer="byte", val_fraction=0.2, workers=1, progress=False)
    prepare(sources["code"], code, tokenizer="bpe", vocab_size=300, val_fraction=0.2, workers=1, progress=False,
            cache_dir=tmp_path / "cache")
    good = {"prose": {"path": str(prose), "weight": 1.0}}
    cases = [
        ({"prose": {"path": str(tmp_path / "nope"), "weight": 1}}, 16, "data.sources.prose.path=", "does not exist"),
        ({"prose": {"path": str(prose), "weight": 0}}, 16, "data.sources.prose.weight=0", "positive"),
        ({"prose": {"path": str(prose), "weight": -1.5}}, 16, "data.sources.prose.weight=-1.5", "positive"),
        (good, 10**6, "data.sources.prose.path=", "shorter than one sequence", "data.seq_len=1000000"),
        ({**good, "code": {"path": str(code), "weight": 1}}, 16, "data.sources.code.path=", "another tokenizer"),
        ({"prose": {"path": str(sources["prose"]), "weight": 1}}, 16, "no manifest.json"),
    ]
    for spec, seq_len, *match in cases:
        with pytest.raises(ValueError) as info:
            open_sources(spec, None, seq_len)
        for m in match:
            assert m in one_line(info), one_line(info)
    bpe = load_tokenizer(code / "tokenizer")
    with pytest.raises(ValueError) as info:  # a manifest from another tokenizer than the one the config names
        open_sources(good, None, 16, bpe)
    assert "than data.tokenizer_path names" in one_line(info)
    shard = prose / "train" / "shard_00000.bin"
    with open(shard, "ab") as f:
        f.write(b"\0")  # one byte more: not a whole uint16 token
    with pytest.raises(ValueError) as info:
        open_sources(good, None, 16)
    assert "is corrupt" in one_line(info) and "not a multiple of the uint16 token width (2 bytes)" in one_line(info)


def test_prepare_command_line(sources, tmp_path, capsys):
    from olm.cli import main

    out = tmp_path / "out"
    assert main(["data", "prepare", str(sources["code"]), "--out", str(out), "--val-fraction", "0.2", "--quiet",
                 "--workers", "1", "--shard-tokens", "500"]) == 0
    manifest = json.loads((out / "manifest.json").read_text())
    assert capsys.readouterr().out.startswith(f"wrote {out}: train {manifest['splits']['train']['num_tokens']:,} ")
    # a second source reuses the first one's tokenizer through --tokenizer-path
    assert main(["data", "prepare", str(sources["prose"]), "--out", str(tmp_path / "b"), "--tokenizer-path", str(out),
                 "--quiet", "--val-fraction", "0.2"]) == 0
    assert len(open_sources({"a": {"path": str(out)}, "b": {"path": str(tmp_path / "b")}}, None, 16)) == 2
    bad = {("nope", "--out", str(tmp_path / "x")): "input 'nope' does not exist",
           (str(sources["prose"]), "--out", str(out)): "already holds a prepared dataset",
           (str(sources["prose"]), "--out", str(tmp_path / "y"), "--val-fraction", "2"): "--val-fraction=2.0",
           (str(sources["prose"]), "--out", str(tmp_path / "z"), "--tokenizer", "hf"): "needs --tokenizer-path"}
    for argv, message in bad.items():
        capsys.readouterr()
        assert main(["data", "prepare", *argv, "--quiet"]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith("error: ") and message in err[0], err


def test_a_failed_first_attempt_does_not_block_the_corrected_command(tmp_path):
    (tmp_path / "docs.jsonl").write_text("".join(json.dumps({"content": f"document {i} " * 30}) + "\n"
                                                 for i in range(40)))
    out = tmp_path / "out"
    args = dict(tokenizer="byte", val_fraction=0.2, workers=1, progress=False)
    with pytest.raises(ValueError, match="text_field='text' is not a field of line 1 .*; fields: content"):
        prepare(tmp_path / "docs.jsonl", out, **args)
    assert not out.exists()  # nothing half-made is left to refuse the corrected command
    manifest = prepare(tmp_path / "docs.jsonl", out, text_field="content", **args)
    assert manifest["splits"]["train"]["num_documents"] + manifest["splits"]["val"]["num_documents"] == 40
