# Two commands for a fresh machine: `make train` and `make test`. Both create or reuse .venv and install what they need.
VENV ?= .venv
PYTHON ?= python3
TORCH ?= torch==2.13.0
ARGS ?=
# Two test workers (pytest-xdist): the suite spends much of its time in subprocess start-up, which overlaps well;
# work stealing keeps both busy to the end (the long multi-process tests would otherwise finish on one).
PYTEST_ARGS ?= -n 2 --dist worksteal --durations=15
BIN := $(VENV)/bin
STAMP := $(VENV)/.olm-installed

.PHONY: install train test clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)

# Reinstall when the package metadata changes. torch comes first, from pip (which finds the build already on this
# disk), so that the rest keeps it; uv installs the rest, several times faster than pip's resolver.
$(STAMP): pyproject.toml | $(BIN)/python
	$(BIN)/python -c "import torch" 2>/dev/null || $(BIN)/python -m pip install -q "$(TORCH)"
	$(BIN)/python -m pip install -q "uv>=0.5"
	$(BIN)/uv pip install -q --python $(BIN)/python -e ".[dev,hf,eval]"
	@# An editable install skips the wheel's olm-lm-eval.pth (lm_eval --model olm); put it in the venv by hand.
	$(BIN)/python -c "import shutil, sysconfig; shutil.copy('olm-lm-eval.pth', sysconfig.get_paths()['purelib'])"
	@# hydra-optuna-sweeper pins optuna < 3; olm has its own Optuna sweeper, and an older .venv may still hold it.
	$(BIN)/uv pip uninstall -q --python $(BIN)/python hydra-optuna-sweeper 2>/dev/null || true
	touch $@

install: $(STAMP)

train: $(STAMP)
	$(BIN)/olm-train $(ARGS)

# As root, a one-node SLURM cluster for the tests marked `slurm` (scripts/slurm-cluster.sh), started in the background
# so that its installation overlaps the first tests; they wait for it. Elsewhere those tests skip, saying why.
test: $(STAMP)
	@if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
		mkdir -p .cache; bash scripts/slurm-cluster.sh >.cache/slurm-cluster.log 2>&1 & fi
	$(BIN)/python -m pytest -q $(PYTEST_ARGS)

clean:
	rm -rf $(VENV) .cache outputs multirun
