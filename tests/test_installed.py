"""olm as an installed library: the wheel in a fresh environment outside the checkout, with only the base
dependencies (lm-eval, the extra [eval], is made unimportable there), running the defaults and a team repository
whose preset uses its own components of every kind."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
from omegaconf import OmegaConf

ROOT = Path(__file__).resolve().parents[1]

TEAM_BLOCKS = '''
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from olm.nn import Block
from olm.nn.attention import MultiHeadAttention
from olm.nn.position import ALiBi
from olm.registry import register
from olm.train.config import OptimizerConfig
from olm.train.optim import BUILDERS


@register("norm", "scalenorm")
class ScaleNorm(Block):
    """ScaleNorm: x * g / ||x||."""

    def __init__(self, dim: int, eps: float = 1e-5):
        super().__init__()
        self.g, self.eps = torch.nn.Parameter(torch.tensor(dim**0.5)), eps

    def forward(self, x):
        return self.g * x / x.norm(dim=-1, keepdim=True).clamp_min(self.eps)


@register("ffn", "relu2_mlp")
class Relu2MLP(Block):
    """Squared-ReLU MLP."""

    def __init__(self, embed_dim: int, ff_multiplier: float = 4.0, dropout: float = 0.0):
        super().__init__()
        hidden = int(embed_dim * ff_multiplier)
        self.up, self.down = torch.nn.Linear(embed_dim, hidden), torch.nn.Linear(hidden, embed_dim)

    def forward(self, x):
        return self.down(F.relu(self.up(x)).square())


@register("attention", "team_mha")
class TeamAttention(MultiHeadAttention):
    """The team's attention."""


@register("position", "team_alibi")
class TeamALiBi(ALiBi):
    """The team's ALiBi."""


@register("optimizer", "team_sgd")
@dataclass
class TeamSGDConfig(OptimizerConfig):
    """The team's plain SGD."""

    name: str = "team_sgd"
    lr: float = 0.05


BUILDERS[TeamSGDConfig] = lambda groups, cfg, device_type: torch.optim.SGD(groups, lr=cfg.lr)
'''
TEAM_PRESET = """\
# A team preset on olm's schema, with four of the team's own components.
defaults:
  - schema_lm
  - attention: team_mha
  - norm: scalenorm
  - ffn: relu2_mlp
  - position: team_alibi
  - _self_
imports: [team_blocks]
vocab_size: ${data.vocab_size}
max_seq_len: ${data.seq_len}
embed_dim: 32
num_heads: 2
num_layers: 2
"""
TEAM_BROKEN = """\
defaults:
  - schema_lm
  - norm: team_norm
  - _self_
imports: [team_missing_module]
vocab_size: ${data.vocab_size}
max_seq_len: ${data.seq_len}
"""
TEAM_OPTIM = "defaults:\n  - schema_team_sgd\n  - _self_\n"
TEAM_DATA = """\
# The team's corpus.
source: text
path: ${oc.env:TEAM_DATA}
tokenizer: byte
seq_len: 32
batch_size: 4
val_batches: 2
"""
TEAM_EXPERIMENT = """\
# @package _global_
defaults:
  - override /model: team_tiny
  - override /optim: team_sgd
  - override /data: team_corpus
  - override /trainer: cpu
  - override /logger: csv
trainer: {max_steps: 6, val_check_interval: 6, enable_progress_bar: false}
scheduler: {warmup_steps: 1}
sample: {max_new_tokens: 0}
callbacks: {eval: {tasks: []}}
hydra:
  sweeper:
    params:
      model.ff_multiplier: 2,3
"""
# Makes lm-eval unimportable, as where it is not installed (the test environment's site-packages has it).
NO_LM_EVAL = '''
import sys
from importlib.machinery import PathFinder


class PathFinderWithoutLmEval(PathFinder):
    @classmethod
    def find_spec(cls, fullname, path=None, target=None):
        if fullname.partition(".")[0] == "lm_eval":
            return None
        return super().find_spec(fullname, path, target)


sys.meta_path[sys.meta_path.index(PathFinder)] = PathFinderWithoutLmEval
'''
# Hydra's compose API with no import of the team's, then olm components, olm models and olm-train --help, in one
# process (each entry point's function, as its console script calls it) to save three interpreter start-ups.
TEAM_LISTINGS = """
import contextlib, io, json
from hydra import compose, initialize_config_dir
from olm.cli import main
from olm.train.cli import help_text
from olm.train.config import conf_dir

with initialize_config_dir(config_dir=str(conf_dir()), version_base="1.3"):
    cfg = compose("train", overrides=["model=team_tiny", "optim=team_sgd"])
m = cfg.model
out = {"composed": [m.attention.name, m.norm.name, m.ffn.name, m.position.name, cfg.optim.name]}
for command in (["components"], ["models", "--family", "config"]):
    stdout, stderr = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(stdout), contextlib.redirect_stderr(stderr):
        code = main(command)
    out[command[0]] = [code, stdout.getvalue(), stderr.getvalue()]
out["help"] = help_text()
print(json.dumps(out))
"""


@pytest.fixture(scope="module")
def installed(tmp_path_factory):
    """olm built as a wheel and installed (not editable) into a new environment outside the checkout; its other
    dependencies come from the test environment's site-packages (a path entry: its .pth files, olm's editable
    install among them, are not run), lm-eval excepted. Returns (bin dir, environment variables, a team repo)."""
    tmp = tmp_path_factory.mktemp("installed")
    wheels = tmp / "wheels"
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w",
                    str(wheels), str(ROOT)], check=True, capture_output=True, timeout=300)
    wheel = next(wheels.glob("olm-*.whl"))
    names = zipfile.ZipFile(wheel).namelist()
    assert "olm/conf/train.yaml" in names and "olm/conf/experiment/ffn_multiplier.yaml" in names
    assert "hydra_plugins/olm_plugins/__init__.py" in names
    env_dir = tmp / "env"
    subprocess.run([sys.executable, "-m", "venv", str(env_dir)], check=True, timeout=120)
    python = env_dir / "bin" / "python"
    site = subprocess.run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                          capture_output=True, text=True, check=True).stdout.strip()
    # every site-packages of this interpreter, a chained environment's too (path entries run no .pth files)
    deps = [path for path in sys.path if Path(path).name == "site-packages"]
    Path(site, "test_deps.pth").write_text("".join(f"{path}\n" for path in deps))
    Path(site, "no_lm_eval.py").write_text(NO_LM_EVAL)
    Path(site, "no_lm_eval.pth").write_text("import no_lm_eval\n")
    subprocess.run([str(python), "-m", "pip", "install", "-q", "--no-deps", "--no-index", str(wheel)], check=True,
                   capture_output=True, timeout=300)

    team = tmp / "team"
    for path, text in {"team_blocks.py": TEAM_BLOCKS, "conf/model/team_tiny.yaml": TEAM_PRESET,
                       "conf/model/team_broken.yaml": TEAM_BROKEN, "conf/optim/team_sgd.yaml": TEAM_OPTIM,
                       "conf/data/team_corpus.yaml": TEAM_DATA,
                       "conf/experiments/team_ablation.yaml": TEAM_EXPERIMENT,
                       **{f"corpus/notes{i}.txt": f"def add{i}(a, b):\n    return a + b\n" * 40 for i in range(40)},
                       }.items():
        (team / path).parent.mkdir(parents=True, exist_ok=True)
        (team / path).write_text(text)
    env = {**os.environ, "TEAM_DATA": str(team / "corpus"), "OMP_NUM_THREADS": "1",
           "OLM_CACHE_DIR": str(tmp / "cache")}
    env.pop("PYTHONPATH", None)
    where = subprocess.run([str(python), "-c", "import olm; print(olm.__file__)"], cwd=team, env=env,
                           capture_output=True, text=True, check=True).stdout
    assert where.startswith(str(env_dir)), where  # the wheel's olm, not the checkout's
    missing = subprocess.run([str(python), "-c", "import lm_eval"], env=env, capture_output=True, text=True)
    assert missing.returncode == 1 and "No module named 'lm_eval'" in missing.stderr
    return env_dir / "bin", env, team


def run(bin_dir: Path, args: list[str], cwd: Path, env: dict, timeout: int = 300) -> subprocess.CompletedProcess:
    return subprocess.run([str(bin_dir / args[0]), *args[1:]], cwd=cwd, env=env, capture_output=True, text=True,
                          timeout=timeout)


@pytest.mark.slow
def test_a_plain_install_trains_the_defaults_without_lm_eval(installed, tmp_path):
    """`pip install olm` without extras: `olm-train model=lm_tiny` trains (its default evaluation skipped, said
    once); asking for the evaluation to be required is refused in one line before a run dir exists."""
    bin_dir, env, _ = installed
    fast = ["trainer.max_steps=2", "trainer.val_check_interval=2", "trainer.log_every_n_steps=1", "data.val_batches=1",
            "sample.max_new_tokens=0", "logger=none", "trainer=cpu"]
    proc = run(bin_dir, ["olm-train", "model=lm_tiny", *fast, f"hydra.run.dir={tmp_path}/run"], tmp_path, env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["status"] == "finished" and summary["steps"] == 2
    note = "callbacks.eval.tasks=['olm'] skipped: lm-eval is not installed (pip install 'olm[eval]' adds it"
    assert (proc.stdout + proc.stderr).count(note) == 1, proc.stdout + proc.stderr
    assert note in (tmp_path / "run" / "train.log").read_text() and "eval/" not in json.dumps(summary)

    proc = run(bin_dir, ["olm-train", "model=lm_tiny", *fast, "callbacks.eval.without_lm_eval=refuse",
                         f"hydra.run.dir={tmp_path}/refused"], tmp_path, env)
    assert proc.returncode == 2 and not (tmp_path / "refused").exists()
    assert proc.stderr.strip().splitlines() == [
        "error: callbacks.eval.tasks=['olm'] with callbacks.eval.without_lm_eval=refuse needs lm-eval: "
        "pip install 'olm[eval]' (or callbacks.eval.tasks=[] for no downstream evaluation)"], proc.stderr
    proc = run(bin_dir, ["olm-train", "--cfg", "job", "callbacks.eval.without_lm_eval=never"], tmp_path, env)
    assert proc.returncode == 2 and "callbacks.eval.without_lm_eval='never'" in proc.stderr
    assert "known: skip, refuse" in proc.stderr, proc.stderr


@pytest.mark.slow
def test_the_wheel_runs_a_team_repository_from_a_fresh_environment(installed, tmp_path):
    """A team repository with its own conf/ (a preset of four team components, a team optimizer, a data config,
    experiments/) and its own blocks composes on top of the installed olm's tree and trains, from the team's
    directory, through olm-train, -m, --cfg job and Hydra's compose API; olm components, olm models and
    olm-train --help list the team's components and presets, a broken preset in one line."""
    bin_dir, env, team = installed
    proc = run(bin_dir, ["olm-train", "-m", "+experiment=team_ablation", f"hydra.sweep.dir={tmp_path}/sweep"],
               team, env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    for job in ("0", "1"):
        summary = json.loads((tmp_path / "sweep" / job / "summary.json").read_text())
        saved = OmegaConf.load(tmp_path / "sweep" / job / "config.yaml")
        assert summary["status"] == "finished" and summary["steps"] == 6
        m = saved.model
        assert (m.attention.name, m.norm.name, m.ffn.name, m.position.name) == (
            "team_mha", "scalenorm", "relu2_mlp", "team_alibi")
        assert saved.optim.name == "team_sgd" and saved.data.path == str(team / "corpus")
    assert {OmegaConf.load(tmp_path / "sweep" / j / "config.yaml").model.ff_multiplier for j in "01"} == {2, 3}

    assert "(SGD)" in (tmp_path / "sweep" / "0" / "train.log").read_text()  # the team's builder made it
    assert not (team / ".cache").exists() and (Path(env["OLM_CACHE_DIR"]) / "tokens").is_dir()  # the documented cache
    # olm's own presets with the team's blocks chosen on the command line
    proc = run(bin_dir, ["olm-train", "--cfg", "job", "model=lm_tiny", "model.imports=[team_blocks]",
                         "model/norm=scalenorm", "model/ffn=relu2_mlp"], team, env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert OmegaConf.create(proc.stdout).model.ffn.name == "relu2_mlp"
    proc = run(bin_dir, ["olm-train", "--cfg", "job", "model=team_tiny", "optim=team_sgd", "data=team_corpus"],
               team, env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    job = OmegaConf.create(proc.stdout)
    assert job.model.norm.name == "scalenorm" and (job.optim.name, job.optim.lr) == ("team_sgd", 0.05)
    proc = run(bin_dir, ["olm-train", "model=team_tinyy"], team, env)
    assert proc.returncode == 2 and "did you mean 'team_tiny'?" in proc.stderr, proc.stderr
    # a mistake beside a team preset is still the one reported
    proc = run(bin_dir, ["olm-train", "--cfg", "job", "model=team_tiny", "optim.lrr=2"], team, env)
    assert proc.returncode == 2 and proc.stderr.startswith("error: optim.lrr is not a config key"), proc.stderr
    broken = ("error: model=team_broken: model.imports[0]='team_missing_module' cannot be imported: "
              "No module named 'team_missing_module'")
    proc = run(bin_dir, ["olm-train", "--cfg", "job", "model=team_broken"], team, env)
    assert proc.returncode == 2 and proc.stderr.strip() == broken.replace("model=team_broken: ", ""), proc.stderr

    proc = run(bin_dir, ["python", "-c", TEAM_LISTINGS], team, {**env, "COLUMNS": "1000"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(proc.stdout.splitlines()[-1])
    assert out["composed"] == ["team_mha", "scalenorm", "relu2_mlp", "team_alibi", "team_sgd"]
    code, listing, _ = out["components"]
    for listed in ("scalenorm(eps: float = 1e-05)", "relu2_mlp()", "team_mha(", "team_alibi()", "team_sgd("):
        assert code == 0 and listed in listing, listed
    code, listing, errors = out["models"]
    assert code == 2 and errors.strip() == broken, errors
    assert "team_tiny " in listing and "lm_tiny " in listing
    options = {line.split(":")[0].strip(): line for line in out["help"].splitlines() if ": " in line}
    for group, name in (("model", "team_tiny"), ("optim", "team_sgd"), ("model/attention", "team_mha"),
                        ("model/norm", "scalenorm"), ("model/ffn", "relu2_mlp"), ("model/position", "team_alibi")):
        assert name in options[group], (group, out["help"])
