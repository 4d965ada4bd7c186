"""`olm components` and `olm generate` as a user runs them: wrapped listings, one-line errors, run dirs."""

import os
import re

import pytest
import torch

import olm
from olm import registry
from olm.cli import main
from olm.data import ByteTokenizer
from olm.generate import generate

from conftest import TINY

BYTE_MODEL = {**TINY, "vocab_size": 256, "max_seq_len": 16}


def write_checkpoint(path, model) -> None:
    """A checkpoint shaped like the ones olm-train writes through Lightning, without training."""
    path.parent.mkdir(parents=True, exist_ok=True)
    state = {
        "state_dict": {"model." + k: v for k, v in model.state_dict().items()},
        "olm": {"model_config": model.to_config()},
        "global_step": 0,
    }
    torch.save(state, path)


def tiny_model(config=BYTE_MODEL, seed=0):
    torch.manual_seed(seed)
    return olm.build_model(config).eval()


def greedy_text(model, tokenizer, prompt: str, max_new_tokens: int) -> str:
    ids = torch.tensor(tokenizer.encode(prompt))
    out = generate(model, ids, max_new_tokens, temperature=0, slide_context=True)
    return tokenizer.decode(out[0].tolist())


def entry_text(out: str, name: str) -> str:
    """The entry ``name`` of an `olm components` listing, its continuation lines joined on one line."""
    lines = out.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith(f"  {name}("))
    end = start + 1
    while end < len(lines) and lines[end].startswith("      "):
        end += 1
    return " ".join(line.strip() for line in lines[start:end])


# ---- olm components


def test_components_wrap_at_the_terminal_width(monkeypatch, capsys):
    monkeypatch.setenv("COLUMNS", "60")
    assert main(["components"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert max(len(line) for line in lines) <= 60
    # kind headers at column 0 (their continuations at 4), entries at 2, entry continuations at 6
    for line in lines:
        indent = len(line) - len(line.lstrip(" "))
        assert indent in (0, 2, 4, 6), line
    continuations = [line for line in lines if line.startswith("      ")]
    assert len(continuations) > 20  # wrapping happened
    monkeypatch.setenv("COLUMNS", "400")
    assert main(["components", "norm"]) == 0
    # wide enough: each entry on one line, signature and doc together
    assert capsys.readouterr().out.splitlines()[1:] == [
        "  layernorm(eps: float = 1e-05, affine: bool = True, bias: bool = True)  LayerNorm via "
        "F.layer_norm; affine=False gives OLMo's non-parametric norm, bias=False drops the shift only.",
        "  rmsnorm(eps: float = 1e-06, affine: bool = True)  RMSNorm via F.rms_norm (Llama, Mistral, Qwen2, "
        "Gemma with its 1+w weights folded in at import).",
    ]


def test_components_list_only_parameters_a_config_may_set(monkeypatch, capsys):
    monkeypatch.setenv("COLUMNS", "60")
    assert main(["components", "attention"]) == 0
    out = capsys.readouterr().out
    mha = entry_text(out, "mha")
    signature = mha[mha.index("(") + 1 : mha.index(")")]
    names = [re.match(r"\w+", part).group() for part in signature.split(", ")]
    assert names == ["bias", "out_bias", "head_dim", "qk_norm", "softcap", "scale", "qk_norm_scope", "sinks"]
    assert "out_bias: bool | None = None" in mha and "Multi-head self-attention" in mha
    assert "num_kv_heads: int = 1" in entry_text(out, "gqa")
    # what is listed a config accepts; what is left out it rejects
    olm.build_model({**TINY, "attention": {"name": "mha", "bias": True, "softcap": 30.0, "head_dim": 8}})
    for key in ("dropout", "causal"):
        with pytest.raises(registry.ConfigError, match=f"attention.{key} is set by the enclosing block"):
            olm.build_model({**TINY, "attention": {"name": "mha", key: 0.0 if key == "dropout" else True}})
    monkeypatch.setenv("COLUMNS", "400")
    assert main(["components", "position"]) == 0
    assert "  rope(base: float = 10000.0, scaling: dict | None = None, rotary_dim: int | None = None)  " in (
        capsys.readouterr().out
    )


def test_components_show_the_whole_first_docstring_sentence(monkeypatch, capsys):
    monkeypatch.setitem(registry._REGISTRY, "testkind", {})  # removed again after the test

    @registry.register("testkind", "wrapped")
    class Wrapped:
        """A first sentence long enough that it wraps onto the next line of the docstring (Press et al. 2022,
        e.g.), as the line limit asks. A second sentence that is not shown.

        Details.
        """

        def __init__(self, size: int = 3):
            self.size = size

    @registry.register("testkind", "paragraph")
    class Paragraph:
        """A first paragraph without a period

        ends at the blank line.
        """

    monkeypatch.setenv("COLUMNS", "400")
    assert main(["components", "testkind"]) == 0
    assert capsys.readouterr().out.splitlines() == [
        "testkind:",
        "  paragraph()  A first paragraph without a period",
        "  wrapped(size: int = 3)  A first sentence long enough that it wraps onto the next line of the "
        "docstring (Press et al. 2022, e.g.), as the line limit asks.",
    ]


# ---- olm generate: flags


@pytest.mark.parametrize("flag, value, allowed", [
    ("--prompt", "", "at least one character"),
    ("--top-p", "0", "(0, 1]"),
    ("--top-p", "1.5", "(0, 1]"),
    ("--top-p", "nan", "(0, 1]"),
    ("--temperature", "-0.5", ">= 0"),
    ("--temperature", "nan", ">= 0"),
    ("--top-k", "-1", ">= 0"),
    ("--max-new-tokens", "-3", ">= 0"),
])
def test_generate_rejects_out_of_range_flags_in_one_line(tmp_path, capsys, flag, value, allowed):
    write_checkpoint(tmp_path / "run" / "checkpoints" / "last.ckpt", tiny_model())
    assert main(["generate", "--ckpt", str(tmp_path / "run"), flag, value]) == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    lines = captured.err.splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"error: {flag}") and allowed in lines[0], lines


# ---- olm generate: what --ckpt may point at


def test_generate_from_a_run_dir_holding_only_checkpoints(tmp_path, capsys):
    run = tmp_path / "run"
    older, newer = tiny_model(seed=1), tiny_model(seed=2)
    write_checkpoint(run / "checkpoints" / "epoch=0-step=4.ckpt", older)
    write_checkpoint(run / "checkpoints" / "epoch=1-step=8.ckpt", newer)
    # the newest by mtime, whatever the names say
    os.utime(run / "checkpoints" / "epoch=0-step=4.ckpt", (1_000, 1_000))
    os.utime(run / "checkpoints" / "epoch=1-step=8.ckpt", (2_000, 2_000))
    args = ["generate", "--ckpt", str(run), "--prompt", "ab", "--max-new-tokens", "6", "--temperature", "0"]
    byte = ByteTokenizer()
    assert greedy_text(older, byte, "ab", 6) != greedy_text(newer, byte, "ab", 6)

    assert main(args) == 0  # no last.ckpt: the newest checkpoint, with the byte tokenizer (vocab_size 256)
    assert capsys.readouterr().out == greedy_text(newer, byte, "ab", 6) + "\n"
    os.utime(run / "checkpoints" / "epoch=0-step=4.ckpt", (3_000, 3_000))
    assert main(args) == 0
    assert capsys.readouterr().out == greedy_text(older, byte, "ab", 6) + "\n"
    last = tiny_model(seed=3)
    write_checkpoint(run / "checkpoints" / "last.ckpt", last)  # last.ckpt wins over mtimes
    assert main(args) == 0
    assert capsys.readouterr().out == greedy_text(last, byte, "ab", 6) + "\n"


def test_generate_uses_the_run_tokenizer(tmp_path, capsys):
    from olm.data.tokenizers import EOS, HFTokenizer, train_bpe

    texts = ["def add(a, b):\n    return a + b\n", "def sub(a, b):\n    return a - b\n"] * 20
    tokenizer = HFTokenizer(train_bpe(texts, 300), "bpe", 300, EOS)
    run = tmp_path / "run"
    tokenizer.save(run / "model" / "tokenizer")  # an export cut short after the tokenizer: no config.json
    model = tiny_model({**BYTE_MODEL, "vocab_size": 300})
    write_checkpoint(run / "checkpoints" / "last.ckpt", model)
    args = ["generate", "--ckpt", str(run), "--prompt", "def ", "--max-new-tokens", "5", "--temperature", "0"]
    assert main(args) == 0
    assert capsys.readouterr().out == greedy_text(model, tokenizer, "def ", 5) + "\n"


def test_generate_without_a_tokenizer_for_a_non_byte_vocab(tmp_path, capsys):
    run = tmp_path / "run"
    write_checkpoint(run / "checkpoints" / "last.ckpt", tiny_model({**BYTE_MODEL, "vocab_size": 64}))
    assert main(["generate", "--ckpt", str(run), "--max-new-tokens", "2"]) == 2
    lines = capsys.readouterr().err.splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: no tokenizer found")
    assert repr(str(run / "tokenizer")) in lines[0] and "vocab_size=64" in lines[0]


def test_generate_from_a_dir_without_model_or_checkpoint(tmp_path, capsys):
    (tmp_path / "run" / "checkpoints").mkdir(parents=True)
    assert main(["generate", "--ckpt", str(tmp_path / "run")]) == 2
    lines = capsys.readouterr().err.splitlines()
    assert lines == [
        f"error: --ckpt {str(tmp_path / 'run')!r} holds no model: looked for model/config.json, config.json "
        "and checkpoints/*.ckpt"
    ]
    assert main(["generate", "--ckpt", str(tmp_path / "missing")]) == 2
    lines = capsys.readouterr().err.splitlines()
    assert len(lines) == 1 and repr(str(tmp_path / "missing")) in lines[0] and "does not exist" in lines[0]


# ---- olm generate: past the context


def test_generate_slides_past_the_context_with_a_note(tmp_path, capsys):
    model = tiny_model()  # max_seq_len 16
    write_checkpoint(tmp_path / "run" / "checkpoints" / "last.ckpt", model)
    args = ["generate", "--ckpt", str(tmp_path / "run"), "--temperature", "0"]
    assert main([*args, "--prompt", "abc", "--max-new-tokens", "13"]) == 0  # 3 + 13 = 16 tokens: fits
    assert capsys.readouterr().err == ""
    for prompt, new_tokens in (("abc", 40), ("a" * 30, 5)):  # more tokens than the context; a longer prompt
        assert main([*args, "--prompt", prompt, "--max-new-tokens", str(new_tokens)]) == 0
        captured = capsys.readouterr()
        expected = greedy_text(model, ByteTokenizer(), prompt, new_tokens)
        assert captured.out == expected + "\n"
        notes = captured.err.splitlines()
        assert len(notes) == 1 and notes[0].startswith("note: ") and "the last 15 tokens" in notes[0], notes
    ids = generate(model, torch.tensor(ByteTokenizer().encode("abc")), 40, temperature=0, slide_context=True)
    assert ids.shape == (1, 43)
