"""A command line generated from a dataclass (train.Config): one flag per field, its comment as the help, its type
and bounds checked before any work.

    @dataclass
    class Config:
        lr: Positive = 1e-4          # policy learning rate        -> --lr, a float > 0
        epochs: Count = 1            # passes over each batch      -> --epochs, an int >= 1
        engine: Literal["hf", "vllm"] = "hf"   # rollout engine    -> --engine, one of hf, vllm
    cfg = parse_dataclass(Config, description, check)            # check(cfg) -> why it cannot run, or None

A field's bounds live in its type (`Annotated[float, Bounds(...)]`), so a new number flag is checked by declaring it;
nan and inf are never a setting. A bad value exits with code 2 and one line on stderr, without the usage block.
"""
import argparse
import dataclasses
import inspect
import math
import re
import typing
from typing import Annotated, Literal, NamedTuple


class Bounds(NamedTuple):
    """low <= x <= high (low < x, x < high where open); None: unbounded on that side."""
    low: float | None = None
    high: float | None = None
    low_open: bool = False
    high_open: bool = False

    def violated_by(self, x) -> str | None:
        """'must be > 0' and the like, or None when x is inside."""
        lo = self.low is not None and (x <= self.low if self.low_open else x < self.low)
        hi = self.high is not None and (x >= self.high if self.high_open else x > self.high)
        if not (lo or hi):
            return None
        if self.low is not None and self.high is not None:
            return f"must be in {'(' if self.low_open else '['}{self.low:g}, {self.high:g}{')' if self.high_open else ']'}"
        return f"must be {'>' if self.low_open else '>='} {self.low:g}" if lo else f"must be {'<' if self.high_open else '<='} {self.high:g}"


Positive = Annotated[float, Bounds(0, low_open=True)]  # a rate, a clip, a norm
NonNegative = Annotated[float, Bounds(0)]  # a coefficient; 0 = off
Share = Annotated[float, Bounds(0, 1)]  # a fraction, gamma, lambda
Count = Annotated[int, Bounds(1)]  # how many of something, at least one
Size = Annotated[int, Bounds(0)]  # how many, 0 meaning none / off / the default


def field_spec(tp) -> tuple[type, tuple | None, Bounds | None]:
    """A field's type -> (its Python type, the allowed values of a Literal or None, its Bounds or None)."""
    bounds = None
    if typing.get_origin(tp) is Annotated:
        tp, *extra = typing.get_args(tp)
        bounds = next((e for e in extra if isinstance(e, Bounds)), None)
    if typing.get_origin(tp) is Literal:
        choices = typing.get_args(tp)
        return type(choices[0]), choices, bounds
    return tp, None, bounds


def problem(cls, cfg) -> str | None:
    """The first field of `cfg` whose value its type forbids (not finite, outside its bounds, not a choice), as one line."""
    hints = typing.get_type_hints(cls, include_extras=True)
    for f in dataclasses.fields(cls):
        tp, choices, bounds = field_spec(hints[f.name])
        x, flag = getattr(cfg, f.name), "--" + f.name.replace("_", "-")
        if choices is not None and x not in choices:
            return f"{flag} must be one of {', '.join(map(str, choices))}, not {x!r}"
        if tp is float and not math.isfinite(x):
            return f"{flag} must be a finite number, not {x}"
        if bounds is not None and (why := bounds.violated_by(x)):
            return f"{flag} {why}, not {x}"
    return None


def parse_dataclass(cls, description: str, check, argv=None):
    """A command line generated from dataclass `cls`: one flag per field, its comment (`field: type = default  # help`)
    as the help, its default shown. Then the fields' own types and bounds (`problem`), then check(instance) -> why it
    cannot run (or None): a reason exits with code 2 and one line on stderr, before any work."""
    class Formatter(argparse.RawDescriptionHelpFormatter, argparse.ArgumentDefaultsHelpFormatter):
        pass
    p = argparse.ArgumentParser(description=description, formatter_class=Formatter)
    comments = dict(re.findall(r"^    (\w+): .*?  # (.*)$", inspect.getsource(cls), re.M))
    hints = typing.get_type_hints(cls, include_extras=True)
    for f in dataclasses.fields(cls):
        tp, _, _ = field_spec(hints[f.name])
        flag, doc = "--" + f.name.replace("_", "-"), comments.get(f.name, "")
        if tp is bool:
            p.add_argument(flag, action=argparse.BooleanOptionalAction, default=f.default, help=doc)
        else:
            p.add_argument(flag, type=tp, default=f.default, help=doc)
    cfg = cls(**vars(p.parse_args(argv)))
    error = problem(cls, cfg) or check(cfg)
    if error:  # one line, without the usage block (what to change is in the line)
        p.exit(2, f"{p.prog}: error: {error}\n")
    return cfg
