"""torch.compile scopes and options of LMModule, and DDP gradient compression. The compiled graphs run on the CPU
with the aot_eager backend (AOTAutograd graphs, no code generation), which checks the graph structure and the math
in seconds; inductor's kernels are measured on the GPU (benchmarks/RESULTS.md)."""

import functools

import pytest
import torch

from olm.errors import ConfigError
from olm.train.config import AdamWConfig, SchedulerConfig, speed_config
from olm.train.module import LMModule
from olm.train.speed import inductor_options
from olm.train.strategies import resolve_strategy

CFG = {"name": "lm", "vocab_size": 64, "embed_dim": 32, "num_heads": 2, "num_layers": 3, "max_seq_len": 16,
       "tie_embeddings": True}


def module(**kwargs):
    return LMModule(CFG, AdamWConfig(lr=1e-3), SchedulerConfig(name="constant", warmup_steps=0),
                    speed_config({"fused_loss": False, **kwargs}), max_steps=10, log_every_n_steps=10)


@pytest.mark.parametrize("scope", ["model", "blocks"])
def test_compiled_scopes_equal_eager_and_keep_parameter_names(scope, monkeypatch):
    torch.manual_seed(0)
    ref = module()
    x, y = torch.randint(0, 64, (2, 16)), torch.randint(0, 64, (2, 16))
    ref_loss = ref.loss(x, y)
    ref_loss.backward()
    monkeypatch.setattr(torch, "compile", functools.partial(torch.compile, backend="aot_eager"))
    m = module(compile=True, compile_scope=scope)
    m.load_state_dict(ref.state_dict())
    m.configure_model()
    loss = m.loss(x, y)
    loss.backward()
    assert torch.allclose(loss, ref_loss, atol=1e-6)
    for (name, p), (ref_name, q) in zip(m.named_parameters(), ref.named_parameters()):
        assert name == ref_name and torch.allclose(p.grad, q.grad, atol=1e-6), name
    assert list(m.state_dict()) == list(ref.state_dict())  # checkpoints unchanged by compilation
    compiled_blocks = [b._compiled_call_impl is not None for b in m.model.blocks]
    assert compiled_blocks == [scope == "blocks"] * 3
    assert hasattr(m, "_compiled_loss") == (scope == "model") and hasattr(m, "_compiled_head_loss") == (scope == "blocks")


def test_inductor_options_merge_mode_and_overrides():
    assert inductor_options("default", None) == {}
    assert inductor_options("default", {"coordinate_descent_tuning": True}) == {"coordinate_descent_tuning": True}
    merged = inductor_options("max-autotune-no-cudagraphs", {"coordinate_descent_tuning": False})
    assert merged["max_autotune"] is True and merged["coordinate_descent_tuning"] is False
    assert not merged.get("triton.cudagraphs")
    assert inductor_options("default", {"triton.cudagraphs": False}) == {"triton.cudagraphs": False}
    assert inductor_options("default", {"triton": {"cudagraphs": False}}) == {"triton.cudagraphs": False}


@pytest.mark.parametrize("mode,options,message", [
    ("max-autotune", None, "compile_mode='max-autotune' is not known; did you mean 'max-autotune-no-cudagraphs'? "
                           "known: default, max-autotune-no-cudagraphs"),
    ("default", {"coordinate_descent": True}, "compile_options.coordinate_descent is not a torch inductor option"),
    ("default", {"triton.cudagraph": True}, "compile_options.triton.cudagraph is not a torch inductor option"),
    ("default", {"triton.cudagraphs": True}, "compile_options.triton.cudagraphs=true is not supported"),
    ("default", {"triton": {"cudagraphs": True}}, "compile_options.triton.cudagraphs=true is not supported"),  # Hydra's nesting
    ("default", {"triton": {"cudagraph": True}}, "compile_options.triton.cudagraph is not a torch inductor option"),
    ("default", {"os": 1}, "compile_options.os is not a torch inductor option"),  # a module attribute, not an option
    ("default", ["max_autotune"], "compile_options=['max_autotune']: Cannot merge DictConfig with ListConfig"),
])
def test_bad_compile_settings_are_one_line_errors(mode, options, message):
    with pytest.raises(ConfigError) as info:
        module(compile=True, compile_mode=mode, compile_options={} if options is None else options)
    assert message in str(info.value) and "\n" not in str(info.value)


@pytest.mark.parametrize("compression,hook", [("bf16", "bf16_compress_hook"), ("fp16", "fp16_compress_hook"), ("none", None)])
def test_ddp_gradient_compression_sets_torchs_comm_hook_on_gpus(compression, hook):
    from torch.distributed.algorithms.ddp_comm_hooks import default_hooks

    cfg = {"accelerator": "gpu", "strategy": {"name": "ddp", "gradient_compression": compression, "bucket_cap_mb": 50}}
    strategy = resolve_strategy(cfg["strategy"], cfg["accelerator"])
    assert strategy._ddp_comm_hook is (getattr(default_hooks, hook) if hook else None)
    assert strategy._ddp_kwargs["bucket_cap_mb"] == 50
    assert strategy._ddp_kwargs["gradient_as_bucket_view"] is True  # olm's default: no copy back out of the buckets
    cfg["strategy"] = {**cfg["strategy"], "gradient_as_bucket_view": False}
    assert resolve_strategy(cfg["strategy"], cfg["accelerator"])._ddp_kwargs["gradient_as_bucket_view"] is False  # explicit wins


@pytest.mark.parametrize("accelerator", ["cpu", "auto"])
def test_gradient_compression_without_gpus_is_a_one_line_error(accelerator, monkeypatch):
    """Lightning registers comm hooks on CUDA only: on CPU the setting would silently do nothing."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(ConfigError, match=r"^trainer.strategy.gradient_compression=fp16 needs GPUs .* on CPU use none$"):
        resolve_strategy({"name": "ddp", "gradient_compression": "fp16"}, accelerator)
    assert resolve_strategy({"name": "ddp", "gradient_compression": "none"}, accelerator)


def test_ddp_gradient_compression_hook_rounds_to_bf16(tmp_path):
    """The hook's arithmetic on one process: the bucket comes back as its bf16 rounding divided by the world size."""
    import torch.distributed as dist
    from torch.distributed.algorithms.ddp_comm_hooks import default_hooks

    grads = torch.randn(1000, dtype=torch.float32)

    class Bucket:
        def buffer(self):
            return grads.clone()

    if not dist.is_initialized():
        dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        out = default_hooks.bf16_compress_hook(dist.group.WORLD, Bucket()).wait()
    finally:
        dist.destroy_process_group()
    assert torch.equal(out, grads.bfloat16().float())
    assert not torch.equal(out, grads)
