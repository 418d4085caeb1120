"""A workflow's request parameters, each declared once: its type, default, bounds and
help. The command-line options, the JSON schema of the OpenAPI document, the parsing of
a POST /jobs body (with its 400s) and the job's record are all derived from the one
declaration (snakemake's executor plugins register their settings the same way)."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import Any, TypeVar

import click

from .errors import ConfigError, FieldError

F = TypeVar("F", bound=Callable[..., Any])
_JSON = {int: "integer", float: "number", bool: "boolean", str: "string", list: "array"}
_WORDS = {int: "a whole number", float: "a number", bool: "true or false", str: "a string",
          list: "a list of strings"}


@dataclass(frozen=True)
class Param:
    """One request field: `params.NAME` over HTTP, `--name` (or `flags`) on the command
    line, `NAME` in the job's record."""

    name: str
    kind: type  # int, float, bool, str or list (of strings)
    default: Any
    help: str
    minimum: float | None = None  # inclusive
    below: float | None = None  # exclusive upper bound
    maximum: float | None = None  # inclusive
    choices: tuple[Any, ...] = ()
    flags: tuple[str, ...] = ()  # command-line spellings; default --name-with-dashes
    cli: bool = True  # False: not an option (a list given as trailing arguments, say)
    recorded: bool = True  # kept in the job's record of its options
    gemma: str = ""  # the GEMMA flag it becomes, if any (e.g. -maf)

    def problem(self, value: Any) -> str:
        """What is wrong with a value of the right type ('' when nothing is)."""
        if value is None or self.kind in (bool, str, list) and not self.choices:
            return ""
        if self.choices and value not in self.choices:
            return f"must be one of {', '.join(map(str, self.choices))}"
        if self.minimum is not None and value < self.minimum:
            return f"must be at least {self.minimum:g}"
        if self.below is not None and value >= self.below:
            return f"must be below {self.below:g}"
        if self.maximum is not None and value > self.maximum:
            return f"must be at most {self.maximum:g}"
        return ""

    def typed(self, value: Any) -> bool:
        if value is None:
            return True
        if self.kind is bool:
            return isinstance(value, bool)
        if self.kind is list:
            return isinstance(value, list) and all(isinstance(v, str) for v in value)
        if self.kind is str:
            return isinstance(value, str)
        number = isinstance(value, int | float) and not isinstance(value, bool)
        return number and (self.kind is float or float(value).is_integer())

    def option(self) -> Callable[[F], F]:
        flags = self.flags or (f"--{self.name.replace('_', '-')}",)
        if self.kind is bool:
            return click.option(*flags, self.name, is_flag=True, help=self.help)
        if self.kind is list:  # on the command line: the option once per value
            return click.option(*flags, self.name, multiple=True, help=self.help)
        kind: Any = click.Choice(self.choices) if self.choices and self.kind is str else (
            self.kind)
        return click.option(*flags, self.name, type=kind, default=self.default,
                            show_default=self.default is not None, help=self.help)

    def schema(self) -> dict[str, Any]:
        out: dict[str, Any] = {"type": _JSON[self.kind], "description": self.help}
        if self.kind is list:
            out["items"] = {"type": "string"}
        if self.default is not None and self.kind is not list:
            out["default"] = self.default
        if self.choices:
            out["enum"] = list(self.choices)
        if self.minimum is not None:
            out["minimum"] = self.minimum
        if self.below is not None:
            out["exclusiveMaximum"] = self.below
        if self.maximum is not None:
            out["maximum"] = self.maximum
        return out


class Params:
    """A workflow's parameters, in the order its `--help` lists them."""

    def __init__(self, *params: Param) -> None:
        self.all = params
        self.by_name = {p.name: p for p in params}

    def __iter__(self) -> Iterator[Param]:
        return iter(self.all)

    def without(self, names: Iterable[str]) -> Params:
        gone = set(names)
        return Params(*(p for p in self.all if p.name not in gone))

    def plus(self, *more: Param) -> Params:
        return Params(*self.all, *more)

    def options(self, fn: F) -> F:
        """The command-line options (a decorator)."""
        for param in reversed([p for p in self.all if p.cli]):
            fn = param.option()(fn)
        return fn

    def fields(self, body: dict[str, Any]) -> dict[str, Any]:
        """The declared fields of a body whose other fields are not parameters (map's,
        a worker's claim): parsed as `parse` does, named without a prefix."""
        return self.parse({k: v for k, v in body.items() if k in self.by_name}, prefix="")

    def schema(self) -> dict[str, Any]:
        """`params` in a POST /jobs body, as JSON schema."""
        return {"type": "object", "additionalProperties": False,
                "properties": {p.name: p.schema() for p in self.all}}

    def parse(self, raw: Any, prefix: str = "params.") -> dict[str, Any]:
        """A body's `params` (or, `prefix` "", the declared fields of a body): every
        value typed and in bounds, the defaults filled in; FieldError (400) names the
        parameter."""
        if raw is None:
            raw = {}
        if not isinstance(raw, dict):
            raise FieldError(prefix.rstrip(".") or "body", "must be an object")
        values = {p.name: p.default for p in self.all}
        for key, value in raw.items():
            param = self.by_name.get(key)
            if param is None:
                raise FieldError(f"{prefix}{key}",
                                 f"unknown parameter; known: {', '.join(self.by_name)}")
            if not param.typed(value):
                raise FieldError(f"{prefix}{key}", f"must be {_WORDS[param.kind]}")
            if value is not None and param.kind is float:
                value = float(value)
            elif value is not None and param.kind is int:
                value = int(value)
            problem = param.problem(value)
            if problem:
                raise FieldError(f"{prefix}{key}", problem)
            values[key] = value
        return values

    def check(self, values: dict[str, Any]) -> None:
        """Values from the command line or a request object: ConfigError naming the
        option (exit code 2) for one out of bounds."""
        for param in self.all:
            problem = param.problem(values.get(param.name))
            if problem:
                flag = (param.flags or (f"--{param.name.replace('_', '-')}",))[0]
                raise ConfigError(f"{flag} {problem}, got {values.get(param.name)}")

    def gemma_flags(self, values: dict[str, Any]) -> list[str]:
        """The GEMMA flags of the parameters that are GEMMA's own (`gemma`), as GEMMA is
        given them; a parameter left None is left out (GEMMA's default)."""
        out: list[str] = []
        for p in self.all:
            value = values.get(p.name, p.default)
            if p.gemma and value is not None:
                out += [p.gemma, repr(value) if p.kind is float else str(value)]
        return out

    def gemma_advice(self) -> dict[str, str]:
        """For a GEMMA flag given among free-form flags though it is a parameter: how
        to give it instead."""
        return {p.gemma: f"use {(p.flags or ('--' + p.name.replace('_', '-'),))[0]} "
                f"(params.{p.name} over HTTP)" for p in self.all if p.gemma}

    def from_gemma(self, flags: dict[str, str]) -> dict[str, Any]:
        """The parameters given as GEMMA flags on a GEMMA command line (GN's), typed; the
        others at their defaults. ValueError for a value of the wrong kind."""
        return {p.name: p.kind(flags[p.gemma]) if p.gemma in flags else p.default
                for p in self.all if p.gemma}

    def record(self, values: dict[str, Any]) -> dict[str, Any]:
        """What the job keeps of them."""
        return {p.name: values.get(p.name) for p in self.all if p.recorded}
