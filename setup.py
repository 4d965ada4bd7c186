"""Everything is in pyproject.toml; this file only adds ``olm-lm-eval.pth`` to the wheel's root (site-packages).

The .pth imports ``_olm_lm_eval``, which registers olm in lm-eval's model registry once lm-eval is imported, so that
``lm_eval --model olm`` works with lm-eval releases that do not yet read the ``lm_eval.models`` entry point.
An editable install (``pip install -e``) does not install it; the Makefile copies it into the venv.
"""

import os

from setuptools import setup
from setuptools.command.build_py import build_py

PTH = "olm-lm-eval.pth"


class BuildPyWithPth(build_py):
    def run(self):
        super().run()
        self.copy_file(PTH, os.path.join(self.build_lib, PTH))

    def get_outputs(self, include_bytecode=True):
        return [*super().get_outputs(include_bytecode), os.path.join(self.build_lib, PTH)]


setup(cmdclass={"build_py": BuildPyWithPth})
