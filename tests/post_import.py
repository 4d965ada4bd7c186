"""Source of a finder that calls ``patch(module)`` right after ``module`` is imported, for the test-only
sitecustomize scripts that inject faults into olm-train subprocesses (test_reliability, test_slurm)."""


def after_import(module: str) -> str:
    """Python source defining ``AfterImport``, a meta path finder that patches ``module`` once it has loaded; the
    script defines ``patch`` and inserts ``AfterImport()`` into ``sys.meta_path`` when its fault is asked for."""
    return f'''
class AfterImport(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path, target=None):
        if name != {module!r}:
            return None
        for finder in sys.meta_path:
            if finder is not self and hasattr(finder, "find_spec"):
                spec = finder.find_spec(name, path, target)
                if spec is not None:
                    break
        else:
            return None
        run = spec.loader.exec_module

        def exec_module(module):
            run(module)
            patch(module)

        spec.loader.exec_module = exec_module
        return spec
'''
