"""experiments/attention_2025.yaml: MHA, GQA, MLA and local/global interleaving at equal parameters, and its smoke
size run end to end as a sweep, then `olm compare` gives each variant a verdict against MHA."""

import json

import pytest
import torch

from olm.cli import main
from olm.nn.attention import MultiHeadLatentAttention

from test_sweeps import cache_dir, compose_job, num_parameters, olm_train  # noqa: F401  (cache_dir: a fixture)

VARIANTS = ["attn2025_mha", "attn2025_gqa", "attn2025_mla", "attn2025_local_global"]


def test_variants_have_equal_parameters_and_the_layouts_they_name():
    counts, models = [], {}
    for variant in VARIANTS:
        cfg = compose_job(["+experiment=attention_2025", f"model={variant}"])
        with torch.device("meta"):
            counts.append(num_parameters(cfg))
        models[variant] = cfg.model
    assert max(counts) / min(counts) < 1.001, counts
    assert models["attn2025_gqa"].attention.num_kv_heads == 2
    assert [o.get("attention", {}).get("window") for o in models["attn2025_local_global"].block_overrides] == [
        64, 64, 64, None]
    with torch.device("meta"):
        mla = MultiHeadLatentAttention(192, 6, 256, kv_rank=48, rope_dim=8, nope_dim=24, v_dim=32)
    cache = mla.make_cache(1, 1, "meta", torch.float32)
    assert cache.k.shape[-1] + cache.v.shape[-1] == 56  # per token and layer, vs 2 x 6 x 32 = 384 for MHA


@pytest.mark.slow
def test_smoke_sweep_then_compare_gives_verdicts(tmp_path, cache_dir):  # noqa: F811
    sweep = tmp_path / "attention_2025"
    olm_train(["+experiment=[attention_2025,smoke]", "seeds=2", "logger=none", "trainer.max_steps=6",
               "trainer.val_check_interval=3"], sweep, cache_dir)
    jobs = [p for p in sweep.iterdir() if p.is_dir() and (p / "summary.json").is_file()]
    assert len(jobs) == 8 and {json.loads((p / "summary.json").read_text())["status"] for p in jobs} == {"finished"}
    assert main(["compare", str(sweep), "--out", str(tmp_path / "report")]) == 0
    study, = json.loads((tmp_path / "report" / "report.json").read_text())["studies"]
    assert study["name"] == "attention_2025" and study["baseline"] == "model=attn2025_mha"
    rows = {r["variant"]: r for r in study["variants"] if r["metric"] == "val_loss"}
    assert sorted(rows) == sorted(f"model={v}" for v in VARIANTS)
    assert rows["model=attn2025_mha"]["verdict"] == "baseline"
    for variant in VARIANTS[1:]:
        assert rows[f"model={variant}"]["n"] == 2 and rows[f"model={variant}"]["verdict"], rows[f"model={variant}"]
