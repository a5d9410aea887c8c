"""The scripts of scripts/ as modules for the tests (scripts/ is not a package)."""

import importlib.util
import sys
from pathlib import Path

SCRIPTS = Path(__file__).resolve().parents[1] / "scripts"


def load_script(name: str):
    """scripts/<name>.py imported as the module `name` (registered in sys.modules: dataclasses need it)."""
    spec = importlib.util.spec_from_file_location(name, SCRIPTS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


def load_train(folder: str, name: str | None = None):
    """<folder>/train.py of an experiment as a module (not registered: every experiment has a train.py)."""
    path = SCRIPTS.parent / folder / "train.py"
    spec = importlib.util.spec_from_file_location(name or f"{folder}_train", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module
