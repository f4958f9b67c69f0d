"""Built-in merging methods, one module per paper.

Importing this package imports every module in it, and each module registers its methods with
:func:`taskmerge.registry.register_method`.
"""

from __future__ import annotations

import importlib
import pkgutil

for _module in pkgutil.iter_modules(__path__):
    importlib.import_module(f"{__name__}.{_module.name}")
