"""The registry of model families: name -> Model class.

The package's own families are registered in models/__init__.py, one line each. Families from
outside the package come in two ways:

    uf.models.register("my-family", MyModel)          # in the process that uses it

    # or, for every process (the CLI too), an entry point in the plugin's pyproject.toml:
    [project.entry-points."unifusion.families"]
    my-family = "my_package.family:MyModel"

Entry points are read the first time a name is not found (or the list is asked for), as
pytest reads its plugins. A family may extend another family's command line (`extends =
"diffusion"`: the few-step students add --objective and its keys to `--family diffusion`); when
its `selected_by(options)` is true, it builds the spec instead.
"""
from __future__ import annotations

import warnings

ENTRY_POINT_GROUP = "unifusion.families"
FAMILIES: dict[str, type] = {}
_entry_points_read = False


def register(name: str, cls: type, *, replace: bool = False) -> type:
    """Make `cls` (a models.Model subclass) the family `name`; returns cls, so it can decorate."""
    from .base import Model
    if not (isinstance(cls, type) and issubclass(cls, Model)):
        raise TypeError(f"register({name!r}, ...): a family is a subclass of unifusion.models.Model, got {cls!r}")
    if not isinstance(name, str) or not name or name != name.strip():
        raise ValueError(f"a family name is a non-empty string without spaces around it, got {name!r}")
    own = cls.__dict__.get("family")
    if own is not None and own != name:
        raise ValueError(f"{cls.__name__}.family is {own!r}; register it under that name, not {name!r}")
    if name in FAMILIES and FAMILIES[name] is not cls and not replace:
        raise ValueError(f"the family {name!r} is already registered ({FAMILIES[name].__name__}); pass replace=True "
                         "to replace it")
    if cls.extends is not None and cls.extends == name:
        raise ValueError(f"the family {name!r} cannot extend itself")
    cls.family = name  # the family a spec names is the one it was registered as
    FAMILIES[name] = cls
    _options_cache.clear()
    return cls


def _read_entry_points() -> None:
    """Register every `unifusion.families` entry point once; a plugin that fails to load warns and
    is skipped (it cannot break the families that do load)."""
    global _entry_points_read
    if _entry_points_read:
        return
    _entry_points_read = True
    from importlib.metadata import entry_points
    for ep in entry_points(group=ENTRY_POINT_GROUP):
        if ep.name in FAMILIES:
            continue
        try:
            register(ep.name, ep.load())
        except Exception as e:  # a broken plugin: say which, keep going
            warnings.warn(f"the unifusion family plugin {ep.name!r} ({ep.value}) could not be loaded: {e}",
                          RuntimeWarning, stacklevel=2)


def get(name: str) -> type:
    """The class of family `name`; an unknown name is a one-line ValueError saying how to register it."""
    if name not in FAMILIES:
        _read_entry_points()
    if name not in FAMILIES:
        raise ValueError(f"the model family {name!r} is not registered (known: {', '.join(names())}); a family from "
                         "outside unifusion is registered with unifusion.models.register(NAME, CLASS) or an entry "
                         f"point in the group {ENTRY_POINT_GROUP!r} of the package that defines it")
    return FAMILIES[name]


def names() -> list[str]:
    _read_entry_points()
    return sorted(FAMILIES)


def chain(name: str) -> list[type]:
    """The family and the families extending its command line, in that order."""
    base = get(name)
    return [base] + [cls for n, cls in sorted(FAMILIES.items()) if cls.extends == name and cls is not base]


_options_cache: dict[str, type | None] = {}


def options_class(name: str) -> type | None:
    """One dataclass with the own options of the family and of the families extending it."""
    get(name)  # an unknown name: the one-line error
    if name not in _options_cache:
        from .options import merged
        _options_cache[name] = merged(name, chain(name))
    return _options_cache[name]


def for_config(name: str, options) -> type:
    """The family that builds the spec of a run of `--family name` with these options: an
    extension that the options select (e.g. the students for --objective cd), else the family."""
    picked = [cls for cls in chain(name)[1:] if cls.selected_by(options)]
    return picked[0] if picked else get(name)


def owner_of(key: str) -> list[str]:
    """The families whose command line has the option `key` (the family declaring it, or the one
    it extends), for the error of a key given to another family."""
    import dataclasses
    out = []
    for n in names():
        cls = FAMILIES[n]
        if cls.options is not None and key in {f.name for f in dataclasses.fields(cls.options)}:
            out.append(cls.extends or n)
    return sorted(set(out))
