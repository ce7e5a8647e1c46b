"""Objective terms from outside vispo, usable from a config or the command line.

A term registered with :func:`vispo.algos.register_term` is named in
``objective.extra_terms``. Its code reaches the run in one of two ways, both resolved before the
config is checked:

* ``objective.plugins: [my_terms, path/to/terms.py]``: each entry is imported (a module name
  on ``sys.path``, or a ``.py`` file executed as a private module); importing it runs its
  ``@register_term`` decorators. The list is saved with the run, so ``vispo eval``,
  ``probe`` and ``report`` import the same plugins.
* an installed package's entry point in the group ``vispo.terms`` whose name is the term's
  (``[project.entry-points."vispo.terms"] my_term = "my_pkg.terms:my_term"``): loaded when
  ``extra_terms`` names a term that is not registered yet. A loaded function that is not
  registered under that name is registered then.
"""

from __future__ import annotations

import hashlib
import importlib
import importlib.metadata
import importlib.util
import sys
from collections.abc import Iterable
from pathlib import Path

ENTRY_POINT_GROUP = "vispo.terms"


class PluginError(ValueError):
    """A plugin could not be imported or did not provide the term it was asked for."""


def import_plugin(spec: str):
    """Import one plugin: a module name, or a ``.py`` file path."""
    if not isinstance(spec, str) or not spec.strip():
        raise PluginError(f"objective.plugins: expected a module name or .py path, got {spec!r}")
    if spec.endswith(".py"):
        path = Path(spec).expanduser().resolve()
        if not path.is_file():
            raise PluginError(f"objective.plugins: file not found: {spec}")
        name = "_vispo_plugin_" + hashlib.sha1(str(path).encode()).hexdigest()[:12]
        if name in sys.modules:
            return sys.modules[name]
        loader_spec = importlib.util.spec_from_file_location(name, path)
        module = importlib.util.module_from_spec(loader_spec)
        sys.modules[name] = module
        try:
            loader_spec.loader.exec_module(module)
        except Exception as e:
            sys.modules.pop(name, None)
            raise PluginError(
                f"objective.plugins: error while running {spec}: {type(e).__name__}: {e}"
            ) from e
        return module
    try:
        return importlib.import_module(spec)
    except ImportError as e:
        raise PluginError(f"objective.plugins: cannot import {spec!r} ({e})") from e
    except Exception as e:
        raise PluginError(
            f"objective.plugins: error while importing {spec!r}: {type(e).__name__}: {e}"
        ) from e


def load_terms(plugins: Iterable[str] = (), terms: Iterable[str] = ()) -> list[str]:
    """Import ``plugins``, then load the ``vispo.terms`` entry point of every name in
    ``terms`` that is still unregistered. Returns the names loaded from entry points."""
    from vispo.algos import OBJECTIVE_TERMS, register_term

    for spec in plugins or ():
        import_plugin(spec)
    missing = [t for t in terms or () if t not in OBJECTIVE_TERMS]
    loaded = []
    if missing:
        points = {ep.name: ep for ep in importlib.metadata.entry_points(group=ENTRY_POINT_GROUP)}
        for name in missing:
            if name not in points:
                continue
            try:
                obj = points[name].load()
            except Exception as e:
                raise PluginError(
                    f"entry point {ENTRY_POINT_GROUP}:{name} ({points[name].value}) failed to "
                    f"load: {type(e).__name__}: {e}"
                ) from e
            if name not in OBJECTIVE_TERMS:
                if not callable(obj):
                    raise PluginError(
                        f"entry point {ENTRY_POINT_GROUP}:{name} gave {obj!r}, not a term function"
                    )
                register_term(name)(obj)
            loaded.append(name)
    return loaded
