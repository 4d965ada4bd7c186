"""The run half of a config, declared once: typed schemas for every key outside ``model:``.

``TrainConfig`` is stored in Hydra's ConfigStore as ``schema_train``; ``conf/train.yaml`` extends it, and the YAML
files of each group (data, trainer, optim, scheduler, logger, callbacks, paths) only say where they differ from the
defaults written here. So every default lives in one place, OmegaConf enforces the types while composing
(``optim.lr=abc``, ``compile=maybe``), an unknown key fails while composing (``optim.lrr=1``), and the choices and
ranges declared with :func:`setting` are checked by :func:`check_settings`, which every entry point runs before
anything is built.

The model half is declared by the registry (``olm.train.schema``); ``model`` is typed by the preset's schema.
The root node accepts keys it does not declare from config files, because experiments keep their own variables
there (``shape``, ``shapes``); on the command line an undeclared key still needs ``+key=value``.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional

from omegaconf import MISSING, DictConfig, ListConfig, OmegaConf

from olm.errors import ConfigError, did_you_mean, first_line
from olm.registry import register

# torch.compile modes olm's training step supports. The CUDA-graph modes (reduce-overhead, max-autotune) are refused:
# the profiled step keeps the GPU 98% busy, so graphs could win at most ~2%, and they break on tied embeddings.
COMPILE_MODES = ("default", "max-autotune-no-cudagraphs")
# What one compiled graph covers: the whole model and loss, or each transformer block (plus one for head and loss).
COMPILE_SCOPES = ("model", "blocks")
SDPA_BACKENDS = ("auto", "flash", "cudnn", "efficient", "math")
# torchao's FP8 training recipes (dynamic scaling): one scale per tensor, or per row (finer, slower kernels).
FLOAT8_RECIPES = ("tensorwise", "rowwise")
SCHEDULES = ("cosine", "linear", "constant", "wsd")
LOGGERS = ("wandb", "csv", "none")
WANDB_MODES = ("auto", "online", "offline")
# callbacks.eval where lm-eval (the extra [eval]) is not installed: skip it with one warning, or refuse the run.
EVAL_WITHOUT_LM_EVAL = ("skip", "refuse")
# Lightning's precision names, plus olm's "auto" (bf16-mixed on a GPU with bf16, 32-true otherwise).
PRECISIONS = ("auto", "32-true", "32", "bf16-mixed", "bf16-true", "16-mixed", "16-true", "64-true", "64",
              "transformer-engine", "transformer-engine-float16")
PROFILERS = ("simple", "advanced", "pytorch")
ACCELERATORS = ("auto", "cpu", "gpu", "cuda", "mps", "tpu", "hpu")
# Strategy names checked without importing Lightning; any other name is looked up in Lightning's registry.
STRATEGIES = ("auto", "ddp", "fsdp", "ddp_spawn", "ddp_fork", "ddp_notebook", "single_device")
# olm.data's choices, repeated here so that composing needs no data import; a test keeps the two equal.
DATA_SOURCES = ("stdlib", "text", "bin", "hf_dataset", "prepared")
TOKENIZERS = ("byte", "bpe", "hf")
TOKEN_DTYPES = ("uint16", "uint32")
RESUME_MODES = ("auto", "allow")


# -- declaring a key -------------------------------------------------------------------------------------------------
def setting(default: Any = MISSING, *, choices: tuple | None = None, check: Callable[[Any], bool] | None = None,
            allowed: str = "") -> Any:
    """A schema field with its default and, optionally, the values it may take: ``choices`` (a fixed list, shown
    with the closest match when missed) or ``check`` (a predicate over the resolved value, described by ``allowed``).
    Null passes unless the check says otherwise only for fields declared Optional."""
    meta = {"choices": choices, "check": check, "allowed": allowed}
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda: type(default)(default), metadata=meta)
    return field(default=default, metadata=meta)


def _int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _num(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def positive_int(v) -> bool:
    return _int(v) and v >= 1


def non_negative_int(v) -> bool:
    return _int(v) and v >= 0


def positive_number(v) -> bool:
    return _num(v) and v > 0


def non_negative_number(v) -> bool:
    return _num(v) and v >= 0


def fraction(v) -> bool:
    return _num(v) and 0 <= v <= 1


def val_interval(v) -> bool:
    return positive_int(v) or (_num(v) and not _int(v) and 0 < v <= 1)


def betas(v) -> bool:
    return len(v) == 2 and all(_num(b) and 0 <= b < 1 for b in v)


def one_of_or_bool(*names: str) -> Callable[[Any], bool]:
    return lambda v: isinstance(v, bool) or v in names


# -- the schemas -----------------------------------------------------------------------------------------------------
@dataclass
class SourceConfig:
    """One source of ``data.source=prepared``: a folder written by ``olm data prepare``, and its share of the
    training samples (weights are relative: they need not sum to 1)."""

    path: str = MISSING
    weight: float = setting(1.0, check=positive_number, allowed="a positive number")


@dataclass
class DataConfig:
    """``olm.data.TextDataModule``'s arguments (docs/data.md)."""

    source: str = setting("stdlib", choices=DATA_SOURCES)
    path: Optional[str] = None
    pattern: str = "**/*.txt"
    text_field: str = "text"
    token_dtype: str = setting("uint16", choices=TOKEN_DTYPES)
    tokenizer: str = setting("bpe", choices=TOKENIZERS)
    tokenizer_vocab_size: int = setting(4096, check=lambda v: _int(v) and v >= 257, allowed="an integer >= 257")
    tokenizer_path: Optional[str] = None
    # Known before any data is read for byte, bpe and hf tokenizers (olm.data.known_vocab_size); a bin source sets it.
    vocab_size: Optional[int] = setting("${olm.vocab_size:}", check=lambda v: v is None or positive_int(v),
                                        allowed="a positive integer")
    seq_len: int = setting(256, check=positive_int, allowed="a positive integer")
    batch_size: int = setting(16, check=positive_int, allowed="a positive integer")
    val_batches: Optional[int] = setting(8, check=lambda v: v is None or positive_int(v),
                                         allowed="a positive integer (null: the whole split)")
    val_fraction: float = setting(0.05, check=lambda v: _num(v) and 0 < v < 1, allowed="a number in (0, 1)")
    seed: int = "${seed}"
    num_workers: int = setting(0, check=non_negative_int, allowed="an integer >= 0")
    pin_memory: Optional[bool] = None
    cache_dir: str = "${paths.cache_dir}"
    # data.source=prepared: {name: {path, weight}}, sampled by weight; each is validated as val/<name>/loss and bpb.
    sources: Dict[str, SourceConfig] = field(default_factory=dict, metadata={"entries": SourceConfig})


@dataclass
class TrainerConfig:
    """``lightning.Trainer`` arguments olm passes on (olm sets loggers, callbacks, epochs and sampling itself)."""

    accelerator: str = setting("auto", choices=ACCELERATORS)
    # A number of devices (-1: all), "auto", or a list of device indices.
    devices: Any = setting(1, check=lambda v: v == "auto" or (_int(v) and (v >= 1 or v == -1))
                           or (isinstance(v, (list, ListConfig)) and all(non_negative_int(d) for d in v)),
                           allowed="a positive number of devices, -1 (all), auto, or a list of device indices")
    num_nodes: int = setting(1, check=positive_int, allowed="a positive integer")
    strategy: Any = "auto"
    precision: str = setting("auto", choices=PRECISIONS)
    max_steps: int = setting(300, check=positive_int, allowed="a positive integer")
    # Steps (an integer, counted over the whole run, resumes included) or a fraction of max_steps.
    val_check_interval: Any = setting(150, check=val_interval,
                                      allowed="a positive number of steps (or a fraction in (0, 1])")
    log_every_n_steps: int = setting(10, check=positive_int, allowed="a positive integer")
    gradient_clip_val: Optional[float] = setting(1.0, check=lambda v: v is None or non_negative_number(v),
                                                 allowed="a number >= 0 (null: no clipping)")
    gradient_clip_algorithm: str = setting("norm", choices=("norm", "value"))
    accumulate_grad_batches: int = setting(1, check=positive_int, allowed="a positive integer")
    deterministic: Any = setting(False, check=one_of_or_bool("warn"), allowed="true, false or warn")
    enable_progress_bar: Optional[bool] = True
    enable_model_summary: bool = True
    benchmark: Optional[bool] = None
    # Debugging (conf/debug/): a few batches, one overfitted batch, fewer batches, a profiler, anomaly detection.
    fast_dev_run: Any = setting(False, check=lambda v: isinstance(v, bool) or positive_int(v),
                                allowed="true, false or a positive number of batches")
    # As in Lightning: an integer is a number of batches, a float a fraction of them (so 1 and 1.0 differ).
    overfit_batches: Any = setting(0.0, check=non_negative_number, allowed="a number >= 0 (batches or a fraction)")
    limit_train_batches: Any = setting(None, check=lambda v: v is None or non_negative_number(v),
                                       allowed="a number >= 0 (batches or a fraction)")
    limit_val_batches: Any = setting(None, check=lambda v: v is None or non_negative_number(v),
                                     allowed="a number >= 0 (batches or a fraction)")
    profiler: Optional[str] = setting(None, choices=PROFILERS)
    detect_anomaly: bool = False


# The roles a trainable tensor plays (olm.train.optim.parameter_roles); optim.lr_multipliers is keyed by them.
PARAMETER_ROLES = ("embedding", "hidden", "head", "vector")
MUON_LR_ADJUSTMENTS = ("original", "match_rms_adamw")


def _multiplier(default: float = 1.0) -> Any:
    return setting(default, check=non_negative_number, allowed="a number >= 0 (0 freezes the role)")


@dataclass
class LrMultipliers:
    """Per-role factors on ``optim.lr`` (PARAMETER_ROLES)."""

    embedding: float = _multiplier()
    hidden: float = _multiplier()
    head: float = _multiplier()
    vector: float = _multiplier()


@dataclass
class OptimizerConfig:
    """What every optimizer takes: a learning rate, decoupled weight decay and the parameter groups.

    Groups are made from each tensor's role (``PARAMETER_ROLES``): ``embedding`` (token and position tables),
    ``hidden`` (the matrices inside the blocks), ``head`` (an output projection not tied to the embedding) and
    ``vector`` (norm gains, biases). Each group's learning rate is ``lr`` times its role's multiplier in
    ``lr_multipliers`` (0 freezes the role) and, with ``model.parametrization=mup``, times
    muP's width factor. Weight decay applies to ``hidden`` and ``head`` unless the two switches add the others.
    """

    name: str = MISSING
    lr: float = setting(3e-3, check=positive_number, allowed="a positive number")
    weight_decay: float = setting(0.1, check=non_negative_number, allowed="a number >= 0")
    decay_embeddings: bool = False
    decay_norms_and_biases: bool = False
    lr_multipliers: LrMultipliers = field(default_factory=LrMultipliers)


@register("optimizer", "adamw")
@dataclass
class AdamWConfig(OptimizerConfig):
    """AdamW (torch.optim.AdamW): fused kernels on GPU, foreach on CPU (``fused`` null)."""

    name: str = "adamw"
    betas: List[float] = setting([0.9, 0.95], check=betas, allowed="two numbers in [0, 1), e.g. [0.9, 0.95]")
    eps: float = setting(1e-8, check=positive_number, allowed="a positive number")
    fused: Optional[bool] = None


@register("optimizer", "muon")
@dataclass
class MuonConfig(OptimizerConfig):
    """Muon (torch.optim.Muon) on the hidden matrices, AdamW on the embedding, head and vectors.

    Muon orthogonalises each 2-D hidden matrix's momentum (Newton-Schulz); the fused QKV projection is one matrix.
    Tensors Muon cannot take (3-D MoE expert stacks) go to AdamW with the hidden role's learning rate.
    ``adjust_lr``: torch's scaling of Muon's step by the matrix shape (``match_rms_adamw``: updates of AdamW's RMS,
    so that one ``lr`` suits both halves); ``adamw_lr``: the AdamW half's learning rate (null: ``lr``).
    """

    name: str = "muon"
    # The best of 3e-3 / 6e-3 / 1.2e-2 / 2.4e-2 on make train's run (benchmarks/RESULTS.md, "make train").
    lr: float = setting(0.012, check=positive_number, allowed="a positive number")
    momentum: float = setting(0.95, check=lambda v: _num(v) and 0 <= v < 1, allowed="a number in [0, 1)")
    nesterov: bool = True
    ns_steps: int = setting(5, check=positive_int, allowed="a positive integer")
    adjust_lr: str = setting("match_rms_adamw", choices=MUON_LR_ADJUSTMENTS)
    adamw_lr: Optional[float] = setting(None, check=lambda v: v is None or positive_number(v),
                                        allowed="a positive number (null: optim.lr)")
    betas: List[float] = setting([0.9, 0.95], check=betas, allowed="two numbers in [0, 1), e.g. [0.9, 0.95]")
    eps: float = setting(1e-8, check=positive_number, allowed="a positive number")


@register("optimizer", "lion")
@dataclass
class LionConfig(OptimizerConfig):
    """Lion (Chen et al. 2023, the ``lion-pytorch`` package): the sign of an interpolated momentum, so one state
    tensor per parameter; it wants a learning rate 3-10x below AdamW's and a weight decay as much higher."""

    name: str = "lion"
    lr: float = setting(3e-4, check=positive_number, allowed="a positive number")
    weight_decay: float = setting(1.0, check=non_negative_number, allowed="a number >= 0")
    betas: List[float] = setting([0.9, 0.99], check=betas, allowed="two numbers in [0, 1), e.g. [0.9, 0.99]")


@register("optimizer", "sgd")
@dataclass
class SGDConfig(OptimizerConfig):
    """SGD with (Nesterov) momentum (torch.optim.SGD), the baseline adaptive methods are measured against."""

    name: str = "sgd"
    lr: float = setting(0.3, check=positive_number, allowed="a positive number")
    weight_decay: float = setting(0.0, check=non_negative_number, allowed="a number >= 0")
    momentum: float = setting(0.9, check=lambda v: _num(v) and 0 <= v < 1, allowed="a number in [0, 1)")
    nesterov: bool = True


def optimizer_schema(name: Any, key: str = "optim.name") -> type:
    """The registered schema of optimizer ``name``; an unknown name is one ConfigError listing the known ones."""
    from olm import registry

    known = registry.names("optimizer")
    if name not in known:
        raise ConfigError(f"{key}={name!r} is not a registered optimizer" + did_you_mean(str(name), known))
    return registry.get("optimizer", name).cls


@dataclass
class SchedulerConfig:
    """Linear warmup, then cosine, linear, constant or warmup-stable-decay (olm.train.optim.lr_multiplier)."""

    name: str = setting("cosine", choices=SCHEDULES)
    # null: a tenth of the schedule's steps (30 of the default 300), so a short run warms up as much as a long one.
    warmup_steps: Optional[int] = setting(None, check=lambda v: v is None or non_negative_int(v),
                                          allowed="an integer >= 0 (null: a tenth of the schedule's steps)")
    min_lr_ratio: float = setting(0.1, check=fraction, allowed="a number in [0, 1]")
    decay_fraction: float = setting(0.2, check=lambda v: _num(v) and 0 < v <= 1, allowed="a number in (0, 1]")
    # Steps the schedule spans (null: trainer.max_steps). Set it to plan a run that is stopped and extended later.
    total_steps: Optional[int] = setting(None, check=lambda v: v is None or positive_int(v),
                                         allowed="a positive integer (null: trainer.max_steps)")


@dataclass
class LoggerConfig:
    """W&B through Lightning's WandbLogger (``name: wandb``), or none; metrics.csv is always written."""

    name: str = setting("wandb", choices=LOGGERS)
    mode: str = setting("auto", choices=WANDB_MODES)  # auto: online when WANDB_API_KEY is set, else offline
    project: str = "olm"
    entity: Optional[str] = None
    # One group per experiment (its compare.experiment), else one per multirun (the sweep dir's name).
    group: Optional[str] = "${compare.experiment}"
    tags: List[str] = setting([], check=lambda v: all(isinstance(t, str) and len(t) <= 64 for t in v),
                              allowed="strings of at most 64 characters (W&B's limit)")
    # The run's variant (its overrides without the seed), so that W&B groups a variant's seeds together.
    job_type: Optional[str] = "${olm.variant:}"


@dataclass
class CheckpointConfig:
    save_top_k: int = setting(1, check=lambda v: _int(v) and v >= -1, allowed="an integer >= -1 (-1: keep all)")
    save_last: bool = True


@dataclass
class NanGuardConfig:
    skip_batches: int = setting(0, check=non_negative_int, allowed="an integer >= 0")


def _task_names(v) -> bool:
    return all(isinstance(t, str) and t.strip() == t and t for t in v)


@dataclass
class EvalConfig:
    """Downstream evaluation of the live model through lm-eval (olm.eval; the extra ``[eval]``), logged as
    ``eval/<task>/<metric>``: every ``every_n_steps`` optimizer steps and once when training ends."""

    # lm-eval task or group names: olm's own (olm_next_line, olm_identifier, olm = both), lm-eval's registry
    # (datasets from the local Hugging Face cache only), or YAMLs in include_path. Empty: no evaluation.
    tasks: List[str] = setting([], check=_task_names, allowed="a list of task names (no empty names)")
    every_n_steps: Optional[int] = setting(None, check=lambda v: v is None or positive_int(v),
                                           allowed="a positive integer (null: only when training ends)")
    limit: Optional[int] = setting(200, check=lambda v: v is None or positive_int(v),
                                   allowed="a positive integer (items per task; null: all)")
    batch_size: int = setting(16, check=positive_int, allowed="a positive integer")
    include_path: List[str] = setting([], check=_task_names, allowed="a list of folders of task YAMLs")
    # skip: without lm-eval (a plain `pip install olm`) the run trains and says once that it evaluates nothing.
    without_lm_eval: str = setting("skip", choices=EVAL_WITHOUT_LM_EVAL)


@dataclass
class CallbacksConfig:
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    nan_guard: NanGuardConfig = field(default_factory=NanGuardConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)


@dataclass
class PathsConfig:
    output_dir: str = "${olm.output_dir:}"
    cache_dir: str = "${olm.cache_dir:}"


@dataclass
class SampleConfig:
    prompt: str = "def "
    max_new_tokens: int = setting(200, check=non_negative_int, allowed="an integer >= 0")
    temperature: float = setting(0.8, check=non_negative_number, allowed="a number >= 0 (0: greedy)")
    top_k: Optional[int] = setting(50, check=lambda v: v is None or non_negative_int(v),
                                   allowed="an integer >= 0 (0 or null: off)")
    top_p: Optional[float] = setting(0.95, check=lambda v: v is None or (_num(v) and 0 < v <= 1),
                                     allowed="a number in (0, 1] (null: off)")


@dataclass
class SpeedConfig:
    """The speed options, top-level keys of the run (``compile=true``), grouped for the code (olm.train.speed)."""

    compile: bool = False
    compile_mode: str = setting("default", choices=COMPILE_MODES)
    compile_scope: str = setting("model", choices=COMPILE_SCOPES)
    compile_options: Dict[str, Any] = setting({})
    fused_loss: Any = setting(False, check=one_of_or_bool("auto"), allowed="true, false or auto")
    attention_backend: str = setting("auto", choices=SDPA_BACKENDS)
    float8: Any = setting(False, check=one_of_or_bool(*FLOAT8_RECIPES),
                          allowed=f"false, true (= tensorwise), {', '.join(FLOAT8_RECIPES)}")
    float8_head: bool = False
    activation_checkpointing: bool = False
    # CPU threads per process; null: the cores of this machine divided among its training processes.
    cpu_threads: Optional[int] = setting(None, check=lambda v: v is None or positive_int(v),
                                         allowed="a positive integer (null: cores / processes)")


SPEED_KEYS = tuple(f.name for f in dataclasses.fields(SpeedConfig))


@dataclass
class CompareConfig:
    """What ``olm compare`` needs to know about the experiment a run belongs to (training does not read it)."""

    experiment: Optional[str] = None  # groups the runs in reports, and is the W&B group
    question: Optional[str] = None  # printed at the top of the report
    # The variant the others are compared with, as its overrides ("model.ff_multiplier=2.6666666666666665"; several
    # joined by ","); null: the first variant. `olm compare --baseline` overrides it.
    baseline: Optional[str] = None
    # The metric that ranks the variants: auto is val_loss, or val_bpb when the runs' tokenizers differ.
    metric: str = "auto"


@dataclass
class SweepConfig:
    """Set by olm's Optuna sweeper for each trial's job (never by hand): where the job reports its val loss for
    pruning."""

    study: Optional[str] = None
    storage: Optional[str] = None
    trial: Optional[int] = None


@dataclass
class LadderConfig:
    """A scaling ladder: an experiment run at several sizes (its ``shape`` sweep), each trained on
    ``tokens_per_parameter`` tokens per parameter; ``olm compare`` fits loss against compute for each variant."""

    size: Optional[str] = None  # this run's rung (null: not a ladder); ladder experiments set it to ${shape}
    tokens_per_parameter: Optional[float] = setting(None, check=lambda v: v is None or (_num(v) and v > 0),
                                                    allowed="a number > 0")


@dataclass
class TrainConfig(SpeedConfig):
    data: DataConfig = field(default_factory=DataConfig)
    model: Any = MISSING
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    # The optimizer's own schema, picked by conf/optim/<name>.yaml (optim=muon); see OptimizerConfig.
    optim: Any = field(default=MISSING, metadata={"schema_of": lambda node: optimizer_schema(node.get("name"))})
    scheduler: SchedulerConfig = field(default_factory=SchedulerConfig)
    logger: LoggerConfig = field(default_factory=LoggerConfig)
    callbacks: CallbacksConfig = field(default_factory=CallbacksConfig)
    paths: PathsConfig = field(default_factory=PathsConfig)
    sample: SampleConfig = field(default_factory=SampleConfig)
    # seed: model init, data order (data.seed follows it unless set) and dropout. seeds=N makes a multirun (-m) run
    # every variant N times, with seeds seed, seed+1, ..., seed+N-1 (docs/experiments.md: "Seeds").
    seed: int = setting(0, check=non_negative_int, allowed="an integer >= 0")
    seeds: int = setting(1, check=positive_int, allowed="a positive integer (the number of seeds per variant, -m)")
    compare: CompareConfig = field(default_factory=CompareConfig)
    ladder: LadderConfig = field(default_factory=LadderConfig)
    sweep: SweepConfig = field(default_factory=SweepConfig)
    # The run's name in W&B and in reports: the experiment (or model) and the job's overrides.
    name: str = "${olm.run_name:}"
    # Resume: null (a fresh run), auto (continue the run in hydra.run.dir; refused where there is none) or allow
    # (continue it if there is one, else start it there: job scripts that are started and restarted alike).
    # ckpt_path: a checkpoint file to start from.
    resume: Optional[str] = setting(None, choices=RESUME_MODES)
    ckpt_path: Optional[str] = None
    # A live run holds <run dir>/run.lock and touches it every lock_timeout/3 s; another host takes the lock over
    # once it has seen no heartbeat for lock_timeout s (olm.train.lock).
    lock_timeout: float = setting(60.0, check=positive_number, allowed="a number of seconds > 0")
    export: bool = True  # after training: the model (Block.save format) and its tokenizer in <run dir>/model
    optimized_metric: str = "val/loss"  # returned to Hydra sweepers (Optuna minimises it)


# -- resolvers -------------------------------------------------------------------------------------------------------
def _vocab_size(*, _parent_) -> int:
    from olm.data import known_vocab_size

    try:
        if _parent_.source == "prepared" and _parent_.tokenizer != "hf":  # the tokenizer saved with the data
            from olm.data.prepared import prepared_vocab_size

            return prepared_vocab_size(_parent_.sources, _parent_.path)
        return known_vocab_size(_parent_.source, _parent_.tokenizer, _parent_.tokenizer_vocab_size,
                                _parent_.tokenizer_path)
    except ValueError as exc:
        raise ConfigError(str(exc)) from None


def output_dir() -> str:
    """The job's directory: Hydra's ``runtime.output_dir`` in a running job, its ``run.dir`` when a config is only
    printed (``--cfg job --resolve``); outside Hydra it must be given (``paths.output_dir=...``)."""
    from hydra.core.hydra_config import HydraConfig

    if not HydraConfig.initialized():
        raise ConfigError("paths.output_dir must be set when the config is not run by olm-train "
                          "(e.g. paths.output_dir=outputs/my_run)")
    hc = HydraConfig.get()
    if OmegaConf.is_missing(hc.runtime, "output_dir") or not hc.runtime.output_dir:
        return hc.run.dir
    return hc.runtime.output_dir


def run_name() -> str:
    """``<experiment>/<the job's overrides>`` (as Hydra's ``job.override_dirname`` writes them); without an
    experiment the overrides alone, or the model preset's name when there are none."""
    from hydra.core.hydra_config import HydraConfig

    if not HydraConfig.initialized():
        return "olm"
    hc = HydraConfig.get()
    choices = hc.runtime.choices
    experiment = choices.get("experiment")
    for override in hc.overrides.task:  # a list of experiments (+experiment=[a,b]) is not among the choices
        key, _, value = str(override).lstrip("+").partition("=")
        if key == "experiment":
            experiment = "+".join(part.strip() for part in value.strip("[]").split(",") if part.strip())
    overrides = hc.job.get("override_dirname") or ""
    name = overrides or str(choices.get("model") or "olm")
    if experiment:
        name = f"{experiment}/{overrides}" if overrides else str(experiment)
    seed = next((str(o).partition("=")[2] for o in hc.overrides.task if str(o).lstrip("+").startswith("seed=")), None)
    return f"{name}/seed={seed}" if seed is not None else name


def variant_name() -> str:
    """The job's variant: its overrides without the seed (Hydra's ``job.override_dirname``), or "train"."""
    from hydra.core.hydra_config import HydraConfig

    if not HydraConfig.initialized():
        return "train"
    return HydraConfig.get().job.get("override_dirname") or "train"


def ladder_steps(steps: Any = None, *, _root_) -> int:
    """``${olm.steps:N}``: N, or in a ladder (``ladder.size`` set) the optimizer steps that give
    ``ladder.tokens_per_parameter`` tokens per parameter: ceil(k N / (batch_size x seq_len x accumulate_grad_batches)),
    N counted as for FLOPs (olm.train.flops). Under DDP each step sees world-size times more tokens."""
    ladder = _root_.ladder
    if ladder.size is None:
        if steps is None:
            raise ConfigError("trainer.max_steps=${olm.steps:} needs a number outside a ladder (ladder.size is null)")
        return int(steps)
    if ladder.tokens_per_parameter is None:
        raise ConfigError(f"ladder.size={ladder.size!r} needs ladder.tokens_per_parameter (tokens per parameter, > 0)")
    model = OmegaConf.to_container(_root_.model, resolve=True)
    per_step = _root_.data.batch_size * _root_.data.seq_len * _root_.trainer.accumulate_grad_batches
    return max(1, math.ceil(ladder.tokens_per_parameter * _parameters(repr(sorted(model.items())), model) / per_step))


_PARAMETERS: dict[str, int] = {}


def _parameters(key: str, model: dict) -> int:
    if key not in _PARAMETERS:
        from olm.nn.structure import meta_device
        from olm.registry import build_model
        from olm.train.flops import active_parameters

        with meta_device():
            _PARAMETERS[key] = active_parameters(build_model(model))
    return _PARAMETERS[key]


def register_resolvers() -> None:
    from olm.data.tokenizers import default_cache_dir
    from olm.train import slurm

    resolvers = (("olm.cache_dir", default_cache_dir), ("olm.vocab_size", _vocab_size), ("olm.run_name", run_name),
                 ("olm.output_dir", output_dir), ("olm.variant", variant_name), ("olm.steps", ladder_steps),
                 *slurm.resolvers())
    for name, fn in resolvers:
        if not OmegaConf.has_resolver(name):
            OmegaConf.register_new_resolver(name, fn)


_REGISTERED: list = []  # the registry's entries when the schemas were last stored


def register_configs() -> None:
    """The run schema (``schema_train``), olm's grid sweeper and the registry's model and component schemas in
    Hydra's ConfigStore, and olm's resolvers. Idempotent, and cheap when nothing changed: the schemas are stored
    again only when a component was registered since (a team's block imported) or the store was emptied. Hydra's
    plain compose API gets them through olm's SearchPathPlugin."""
    from hydra.core.config_store import ConfigStore

    from olm import registry
    from olm.train.schema import register_model_configs

    register_resolvers()
    store = ConfigStore.instance()
    entries = [(e.kind, e.name, id(e.cls)) for e in registry.entries()]
    if _REGISTERED == entries and "schema_train.yaml" in store.repo:
        return
    root = OmegaConf.structured(TrainConfig)
    OmegaConf.set_struct(root, False)  # experiments' own variables; the command line is strict all the same
    OmegaConf.set_struct(root.data.sources, False)  # names of one's own: data.sources={code: {path: ...}}
    store.store(name="schema_train", node=root)
    for entry in registry.entries("optimizer"):  # conf/optim/<name>.yaml extends optim/schema_<name>
        store.store(group="optim", name=f"schema_{entry.name}", node=entry.cls)
    # olm's grid sweeper (seeds=N), the default of conf/hydra/default.yaml: Hydra's basic sweeper plus seeds.
    store.store(group="hydra/sweeper", name="olm", provider="olm",
                node={"_target_": "hydra_plugins.olm_plugins.sweeper.OlmSweeper", "max_batch_size": None,
                      "params": None})
    # olm's Optuna sweeper (hparams_search=optuna); hydra_plugins/olm_plugins/optuna_sweeper.py documents each key.
    store.store(group="hydra/sweeper", name="optuna", provider="olm", node={
        "_target_": "hydra_plugins.olm_plugins.optuna_sweeper.OptunaSweeper", "sampler": "tpe", "seed": None,
        "sampler_options": None, "pruner": "none", "pruner_options": None, "direction": "minimize",
        "objectives": ["val_loss"], "study_name": "olm", "storage": None, "n_trials": 20, "n_jobs": 1,
        "params": {}})
    # olm's parallel launcher (hydra/launcher=parallel), on Hydra's joblib launcher: hydra_plugins/olm_plugins/launcher.py.
    store.store(group="hydra/launcher", name="parallel", provider="olm", node={
        "_target_": "hydra_plugins.olm_plugins.launcher.ParallelLauncher", "jobs_per_gpu": 1, "gpus": None,
        "gpus_per_job": None, "jobs": None, "backend": None, "prefer": "processes", "require": None, "verbose": 0,
        "timeout": None, "pre_dispatch": "2*n_jobs", "batch_size": 1, "temp_folder": None, "max_nbytes": None,
        "mmap_mode": "r"})
    register_model_configs()
    _REGISTERED[:] = entries


# -- checking ---------------------------------------------------------------------------------------------------------
def _fields(schema: type, node: DictConfig, prefix: str = ""):
    """(key, field, value) for every field of ``schema`` under ``node`` with declared choices or a check, nested
    schemas walked."""
    for f in dataclasses.fields(schema):
        key = f"{prefix}{f.name}"
        if f.name not in node:
            continue
        sub = node._get_node(f.name)
        nested = _schema_of(f, sub)
        if nested is not None:
            if isinstance(sub, DictConfig) and not sub._is_none():
                yield from _fields(nested, sub, f"{key}.")
            continue
        entries = f.metadata.get("entries")  # a mapping of name -> schema (data.sources)
        if entries is not None:
            sub = node._get_node(f.name)
            if isinstance(sub, DictConfig) and not sub._is_none():
                for name in sub.keys():
                    yield from _fields(entries, sub._get_node(name), f"{key}.{name}.")
            continue
        if f.metadata.get("choices") is not None or f.metadata.get("check") is not None:
            yield key, f, node[f.name]  # resolved only here: other keys may need a running Hydra job


def _schema_of(f: dataclasses.Field, node: Any = None) -> type | None:
    """The schema of a nested node: its field's dataclass, or for a node whose schema depends on its content
    (``optim``: the optimizer's), the one its ``schema_of`` metadata picks."""
    factory = f.default_factory
    if factory is not dataclasses.MISSING and isinstance(factory, type) and dataclasses.is_dataclass(factory):
        return factory
    pick = f.metadata.get("schema_of")
    if pick is not None and isinstance(node, DictConfig) and not node._is_none():
        return pick(node)
    return None


def shown(value: Any) -> str:
    if isinstance(value, (DictConfig, ListConfig)):
        value = OmegaConf.to_container(value, resolve=True)
    return repr(value)


def check_settings(cfg: DictConfig, schema: type = TrainConfig, prefix: str = "") -> None:
    """The choices and ranges declared with :func:`setting`, over a composed config (or the node ``prefix`` of one):
    the first violation is one ConfigError naming the key, the value and what it may be. Types are OmegaConf's to
    enforce."""
    for key, f, value in _fields(schema, cfg, prefix):
        choices, check, allowed = (f.metadata.get(k) for k in ("choices", "check", "allowed"))
        if choices is not None and value is not None and value not in choices:
            raise ConfigError(f"{key}={shown(value)} is not known" + did_you_mean(value, choices))
        if check is None:
            continue
        try:
            good = bool(check(value))
        except TypeError:
            good = False
        if not good:
            raise ConfigError(f"{key}={shown(value)} must be {allowed}")


def declared_keys(schema: type = TrainConfig) -> list[str]:
    return [f.name for f in dataclasses.fields(schema)]


def undeclared_keys(cfg: DictConfig, schema: type = TrainConfig, prefix: str = ""):
    """(key, the node's declared keys) for every key under a declared group that its schema does not declare
    (Hydra's ``+group.key=...`` adds one even to a typed node)."""
    for f in dataclasses.fields(schema):
        if f.name not in cfg or not isinstance(cfg._get_node(f.name), DictConfig):
            continue
        nested = _schema_of(f, cfg._get_node(f.name))
        if nested is None:
            continue
        node, known = cfg[f.name], declared_keys(nested)
        for key in node.keys():
            if key not in known:
                yield f"{prefix}{f.name}.{key}", known
        yield from undeclared_keys(node, nested, f"{prefix}{f.name}.")


def typed(node: DictConfig | dict, schema: type, prefix: str = "") -> Any:
    """``node`` as a checked instance of ``schema`` (defaults filled in, types, choices and ranges checked; ``prefix``
    names the node in errors): the LightningModule and the run take these objects, whether the config came from
    Hydra, a saved config.yaml, Python or a test."""
    from omegaconf.errors import OmegaConfBaseException

    if isinstance(node, DictConfig):
        node = OmegaConf.to_container(node, resolve=True)  # interpolations point into the whole config
    try:
        merged = OmegaConf.merge(OmegaConf.structured(schema), node)
    except OmegaConfBaseException as exc:
        key, value = getattr(exc, "full_key", "") or "", getattr(exc, "value", None)
        if not key and isinstance(node, dict):  # e.g. a list for a mapping: find the key merge by merge
            for name, item in node.items():
                try:
                    OmegaConf.merge(OmegaConf.structured(schema), {name: item})
                except OmegaConfBaseException:
                    key, value = name, item
                    break
        shown_value = f"={value!r}" if value is not None else ""
        raise ConfigError(f"{prefix}{key}{shown_value}: {first_line(exc)}") from None
    check_settings(merged, schema, prefix)
    return OmegaConf.to_object(merged)


def speed_config(cfg: DictConfig | dict) -> SpeedConfig:
    """The speed options (top-level keys) of a run config as a checked SpeedConfig."""
    return typed({k: cfg[k] for k in SPEED_KEYS if k in cfg}, SpeedConfig)


def conf_dir() -> Path:
    """olm's config tree (package data; in a checkout, ``conf/`` links here)."""
    return Path(__file__).resolve().parents[1] / "conf"
