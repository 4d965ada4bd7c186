import os

import pytest
import torch

os.environ.setdefault("WANDB_SILENT", "true")
os.environ.pop("WANDB_API_KEY", None)  # tests never talk to W&B servers
os.environ.setdefault("WANDB_MODE", "offline")
# Each test worker (pytest-xdist) and every olm-train process it starts gets its share of the cores: two 2-thread
# processes on 2 cores train several times slower than two 1-thread ones (benchmarks/RESULTS.md, "CPU threads").
_workers = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
os.environ.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // _workers)))
torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))

TINY = dict(vocab_size=64, embed_dim=32, num_heads=4, num_layers=2, max_seq_len=32)


@pytest.fixture
def tiny_cfg():
    return dict(TINY)


@pytest.fixture(autouse=True)
def _no_hydra_config_left_behind():
    """compose(return_hydra_config=True) sets Hydra's process-wide HydraConfig, as Hydra does for a job; a test
    that composed a multirun config must not make a later test in the same worker look like a sweep job."""
    yield
    from hydra.core.hydra_config import HydraConfig

    HydraConfig.instance().cfg = None
