"""Downstream evaluation through EleutherAI's lm-evaluation-harness (the optional extra ``[eval]``).

- ``olm.eval.harness``: ``OlmLM``, olm's lm-eval model type (``lm_eval --model olm``).
- ``olm.eval.tasks``: olm's own offline tasks, built from the embedded corpus's held-out files.
- ``olm.eval.run``: resolving task names offline, evaluating a model, one line per task (``olm eval``), and the
  evaluator the in-loop callback reuses.

Nothing here downloads: tasks read lm-eval's registry only for datasets already in the local Hugging Face cache,
or local data files. ``olm.eval`` builds on ``olm.nn`` and ``olm.data``, not on training.
"""

from olm.errors import ConfigError


def lm_eval_installed() -> bool:
    import importlib.util

    return importlib.util.find_spec("lm_eval") is not None


def require_lm_eval(what: str, alternative: str = "") -> None:
    """One line naming ``what`` needs lm-eval, where it is not installed (olm installs without the extra)."""
    if not lm_eval_installed():
        raise ConfigError(f"{what} needs lm-eval: pip install 'olm[eval]'{alternative}")
