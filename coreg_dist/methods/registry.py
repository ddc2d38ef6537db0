"""The method registry: a name, a class and (optionally) the method's own config section.

    @register_method("coreg", config=CoRegConfig)     # in coreg_dist/methods/coreg.py
    class CoReg(Method): ...

Every module of the `coreg_dist.methods` package is imported on first use, so a new method is
one new file: no central list to edit. Its config section (`coreg.*`) joins the typed config
tree (coreg_dist/config.py builds the schema from `method_config_sections()`), so presets and
`key=value` overrides are validated for it like for any other section.
"""
from __future__ import annotations

import importlib
import pkgutil
from typing import Dict, List, Optional

_METHODS: Dict[str, type] = {}
_SECTIONS: Dict[str, type] = {}
_RESERVED = {"run", "data", "embedded", "annotator", "synthetic", "model", "train", "dist"}
_NOT_METHODS = {"base", "registry"}
_discovered = False


def register_method(name: str, config: Optional[type] = None):
    """Class decorator: register a method under `name`, with its config dataclass (its section
    in the config tree is `name`)."""
    if name in _RESERVED:
        raise ValueError(f"method name {name!r} collides with the config section of the same name")

    def deco(cls):
        old = _METHODS.get(name)
        if old is not None and (old.__module__, old.__qualname__) != (cls.__module__, cls.__qualname__):
            raise ValueError(f"method {name!r} already registered by {old.__module__}.{old.__qualname__}")
        cls.name = name
        _METHODS[name] = cls
        if config is not None:
            _SECTIONS[name] = config
        return cls
    return deco


def _discover() -> None:
    global _discovered
    if _discovered:
        return
    _discovered = True
    import coreg_dist.methods as pkg

    for mod in pkgutil.iter_modules(pkg.__path__):
        if mod.name not in _NOT_METHODS and not mod.name.startswith("_"):
            importlib.import_module(f"{pkg.__name__}.{mod.name}")


def method_config_sections() -> Dict[str, type]:
    _discover()
    return dict(_SECTIONS)


def list_methods() -> List[str]:
    _discover()
    return sorted(_METHODS)


def get_method(name: str) -> type:
    _discover()
    if name not in _METHODS:
        raise ValueError(f"config key 'train.method': unknown method {name!r}; "
                         f"known: {', '.join(sorted(_METHODS))}")
    return _METHODS[name]
