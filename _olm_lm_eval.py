"""Makes ``lm_eval --model olm`` work with lm-eval releases that do not read the ``lm_eval.models`` entry point.

``olm-lm-eval.pth`` imports this module when Python starts. It imports nothing itself: it waits for lm-eval's
``lm_eval.models`` package to be imported (which every lookup of a model by name does first) and then registers
``olm`` in lm-eval's model registry as a lazy ``module:class`` path, so olm is imported only when it is used.
Releases that read the ``lm_eval.models`` entry point (declared in pyproject.toml) find olm that way as well.
"""

import sys
from importlib.abc import MetaPathFinder
from importlib.util import find_spec

MODULE, NAME, TARGET = "lm_eval.models", "olm", "olm.eval.harness:OlmLM"


class _RegisterOlmAfterImport(MetaPathFinder):
    def find_spec(self, fullname, path=None, target=None):
        if fullname != MODULE:
            return None
        sys.meta_path.remove(self)  # let the other finders find the real module, once
        spec = find_spec(fullname)
        if spec is None or spec.loader is None:
            return spec
        run = spec.loader.exec_module

        def exec_module(module):
            run(module)
            try:
                from lm_eval.api.registry import model_registry

                if NAME not in model_registry:
                    model_registry.register(NAME, target=TARGET)
            except Exception:  # another lm-eval layout: the entry point is then the way in
                pass

        spec.loader.exec_module = exec_module
        return spec


if MODULE not in sys.modules and not any(isinstance(f, _RegisterOlmAfterImport) for f in sys.meta_path):
    sys.meta_path.insert(0, _RegisterOlmAfterImport())
