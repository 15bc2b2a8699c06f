"""Named optimizers: each module registers its paper's recipe as a short chain of shared transforms."""

import importlib
import pkgutil

for _info in pkgutil.iter_modules(__path__):
    importlib.import_module(f"{__name__}.{_info.name}")
