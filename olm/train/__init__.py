"""Training: the run half of olm, split by job.

- ``config``: the typed schema of every run key (``schema_train`` in Hydra's ConfigStore) and olm's resolvers;
- ``compose``: a run config composed as ``olm-train`` composes it, with one-line errors;
- ``checks``: the pre-training checks every entry point runs (``check_run``);
- ``cli``: the ``olm-train`` entry point; ``resume``: resuming a run dir from the command line;
- ``run``: ``train(cfg)``, one job; ``outcome``: summary.json, exit codes, the final lines;
- ``module``: the LightningModule; ``optim``: optimizer and schedule; ``speed``: compile, FP8, SDPA, fused loss;
- ``callbacks``, ``strategies``, ``csv_logging``, ``wandb_logging``, ``flops``; checkpoints are read by ``olm.checkpoint``.

From Python (a notebook, a test)::

    from olm.train.compose import compose
    from olm.train.run import train
    cfg = compose(["model=lm_tiny", "data.tokenizer=byte", "paths.output_dir=outputs/nb"])
    train(cfg)  # runs check_run(cfg) first
"""
