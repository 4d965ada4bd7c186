import os

import pytest
import torch

os.environ.setdefault("WANDB_SILENT", "true")
os.environ.pop("WANDB_API_KEY", None)  # tests never talk to W&B servers
os.environ.setdefault("WANDB_MODE", "offline")
torch.set_num_threads(min(2, torch.get_num_threads()))

TINY = dict(vocab_size=64, embed_dim=32, num_heads=4, num_layers=2, max_seq_len=32)


@pytest.fixture
def tiny_cfg():
    return dict(TINY)
