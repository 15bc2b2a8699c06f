"""Named optimizers: each module registers its paper's recipe as a short chain of shared transforms.

Every registered recipe function is also reachable here by its name, so ``help(trainlab.optim.recipes.galore)``
shows its hyperparameters, defaults and ranges (``help(get_spec(name).factory)`` is the same function).
"""

import importlib
import pkgutil

from trainlab.optim.registry import get_spec, optimizer_names

for _info in pkgutil.iter_modules(__path__):
    importlib.import_module(f"{__name__}.{_info.name}")

for _name in optimizer_names():
    _factory = get_spec(_name).factory
    if _factory.__module__.startswith(f"{__name__}."):
        globals()[_factory.__name__] = _factory
