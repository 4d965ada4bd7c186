"""Every 2025 family's ``_tiny`` preset trains through olm-train's own path: the loss falls; for the MoE families a run
stopped and resumed from its checkpoint gives the same per-step losses bit for bit (routing and balancing biases
included)."""

import pytest
import torch

from olm.nn import LM

from test_train import cache_dir, read_metrics, run, train_losses  # noqa: F401  (cache_dir is a fixture)
from test_zoo import NEW_FAMILIES

# The families whose blocks keep state beyond their parameters and optimizer (routing, DeepSeek's balance bias) or
# route tokens: resumed bit for bit here. Dense blocks resume through the same checkpoint path as every other model
# (tests/test_train.py, tests/test_optimizers.py).
STATEFUL = ("qwen3_moe", "gpt_oss", "deepseek_v3")
COMMON = ["trainer.val_check_interval=3", "logger=none", "sample.max_new_tokens=0", "optim.lr=1e-2",
          "data.val_batches=1", "data.batch_size=4"]


@pytest.mark.slow
@pytest.mark.parametrize("family", NEW_FAMILIES)
def test_tiny_preset_learns_and_resumes_bit_for_bit(family, tmp_path, cache_dir):  # noqa: F811
    model = [f"model={family}_tiny"]
    full, _ = run(tmp_path, cache_dir, [*model, *COMMON, "trainer.max_steps=6"], name="full")
    expected = train_losses(full)
    if family in STATEFUL:
        run(tmp_path, cache_dir, [*model, *COMMON, "trainer.max_steps=3", "scheduler.total_steps=6", "export=false"],
            name="part")
        resumed, _ = run(tmp_path, cache_dir, [*model, *COMMON, "trainer.max_steps=6", "resume=auto",
                                              "export=false"], name="part")
        # steps 1-3 before the stop, 4-6 after the resume: equal floats
        assert len(expected) == 6 and train_losses(resumed) == expected
    losses = list(expected.values())
    assert sum(losses[-2:]) / 2 < sum(losses[:2]) / 2 - 0.3  # it learned
    trained = LM.load(full / "model")
    for block in trained.blocks:
        bias = getattr(block.ffn, "expert_bias", None)
        if bias is not None:  # DeepSeek's balancing bias moved during training, by steps of balance_rate
            assert bias.abs().sum() > 0
            assert torch.allclose(bias / block.ffn.balance_rate, (bias / block.ffn.balance_rate).round(), atol=1e-3)
    rows = [r for r in read_metrics(full) if r.get("train/loss")]
    moe = [b.ffn for b in trained.blocks if hasattr(b.ffn, "last_load")]
    if not moe:
        assert "train/expert_load_max" not in rows[0]
        return
    # MoE: the busiest expert's load over the mean each logged step (>= 1), and the balancing loss where it is on
    assert all(float(r["train/expert_load_max"]) >= 1.0 - 1e-6 for r in rows)
    if any(f.aux_loss_coef for f in moe):
        assert all(float(r["train/aux_loss"]) > 0 for r in rows)

