"""A family's own training options, declared next to its code.

A family lists the options only it uses as a dataclass whose fields are made by `option`:

    @dataclass
    class AutoencoderOptions:
        kl_weight: float = option(1e-6, "weight of KL(q(z|x) || N(0, I)) per pixel", minimum=0)
        rec_loss: str = option("l1", "reconstruction loss", choices=("l1", "l2"))

and names it in its class (`options = AutoencoderOptions`). The configuration (config.py) keeps
the options every run has; it adds these to the command line, YAML files and stored configs of
runs of that family under the same flat names (`--kl-weight`, `kl_weight:`), checks their types,
choices and bounds, shows them grouped by family in `unifusion train --help`, and hands them to
the family as `cfg.options` when it builds its spec. A key of another family is refused with the
family it belongs to.
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import field

TYPES = {"int": int, "float": float, "bool": bool, "str": str, "dict": dict}


def option(default, help: str, *, group: str = "model", choices=None, minimum=None, positive: bool = False):
    """A dataclass field for a family option: its default, a one-line help, the help group, and
    optional checks (one of `choices`; >= `minimum`; finite and > 0 with `positive`)."""
    kw = {"default_factory": dict} if default == {} else {"default": default}
    return field(metadata={"group": group, "help": help, "choices": tuple(choices) if choices else None,
                           "minimum": minimum, "positive": positive}, **kw)


def option_type(f: dataclasses.Field) -> type:
    """The Python type of an option field (annotations may be strings under `from __future__`)."""
    t = f.type
    if isinstance(t, str):
        if t not in TYPES:
            raise TypeError(f"option {f.name}: type {t!r} is not one of {sorted(TYPES)}")
        return TYPES[t]
    if t not in TYPES.values():
        raise TypeError(f"option {f.name}: type {t!r} is not one of {sorted(TYPES)}")
    return t


def check_values(opts, flag) -> None:
    """The generic checks `option` declares (choices, minimum, positive), with `flag(name)` naming
    the command-line flag in the error."""
    for f in dataclasses.fields(opts):
        meta, value = f.metadata, getattr(opts, f.name)
        if meta.get("choices") and value not in meta["choices"]:
            raise ValueError(f"{flag(f.name)} {value!r} is not valid; choose one of {list(meta['choices'])}")
        if meta.get("minimum") is not None and value < meta["minimum"]:
            raise ValueError(f"{flag(f.name)} must be >= {meta['minimum']}, got {value}")
        if meta.get("positive") and not (value > 0 and not math.isinf(value)):
            raise ValueError(f"{flag(f.name)} must be a finite number > 0, got {value}")


def merged(name: str, classes: list) -> type | None:
    """One dataclass holding the option fields of several families (a family and the families
    that extend its command line); a name declared twice is a TypeError."""
    seen: dict[str, type] = {}
    specs = []
    for cls in classes:
        if getattr(cls, "options", None) is None:
            continue
        for f in dataclasses.fields(cls.options):
            if f.name in seen:
                raise TypeError(f"option {f.name!r} is declared by both {seen[f.name].__name__} and {cls.__name__}")
            seen[f.name] = cls
            option_type(f)
            default = (dataclasses.field(default_factory=f.default_factory, metadata=f.metadata)
                       if f.default is dataclasses.MISSING else dataclasses.field(default=f.default, metadata=f.metadata))
            specs.append((f.name, f.type, default))
    return dataclasses.make_dataclass(f"{name.title().replace('-', '')}Options", specs)
