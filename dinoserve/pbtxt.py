"""Protobuf text format, the subset Triton model configurations use.

``config.pbtxt`` files are protobuf text. This reader and writer handle what Triton's model
configurations contain (messages, repeated fields, lists, strings, numbers, identifiers,
``#`` comments) without protobuf or Triton's generated classes, so numpy-only installs (the
client, the index, the app) can read a repository. A parsed config writes back as it was.
What the fields mean is :mod:`dinoserve.repository`'s business, not this module's.
"""

from __future__ import annotations

import re
from typing import Any

from dinoserve.errors import ServerError

__all__ = ["ConfigParseError", "Word", "as_list", "format_pbtxt", "parse_pbtxt"]


class ConfigParseError(ServerError):
    """A ``config.pbtxt`` is not valid protobuf text format."""


class Word(str):
    """A bare protobuf-text identifier (an enum value such as ``TYPE_FP32``, or ``true``):
    equal to its text, but written back without quotes."""


def as_list(value: Any) -> list:
    """``value`` as a list: a repeated field parsed from one entry may be a bare value."""
    return value if isinstance(value, list) else [value]


_TOKEN = re.compile(
    r"""\s+|\#[^\n]*|(?P<str>"(?:[^"\\]|\\.)*"|'(?:[^'\\]|\\.)*')|(?P<punct>[{}\[\]:,;<>])|(?P<word>[^\s{}\[\]:,;<>"'#]+)""",
    re.VERBOSE,
)

#: Fields that Triton declares ``repeated``; they always parse to lists, even with one entry.
_REPEATED = {"input", "output", "instance_group", "parameters", "dims", "gpus", "model_warmup",
             "gpu_execution_accelerator", "cpu_execution_accelerator", "preferred_batch_size",
             "ensemble_scheduling", "step", "cc_model_filenames", "metric_tags"}


def parse_pbtxt(text: str, source: str = "config.pbtxt") -> dict[str, Any]:
    """Parse protobuf text format into nested dicts; repeated fields become lists.

    Scalars: quoted strings -> str, integers -> int, other numbers -> float, anything else
    (enum names, true/false) -> :class:`Word`. ``parameters`` maps keep Triton's
    ``key``/``value`` form. :func:`format_pbtxt` writes the result back.
    """
    tokens: list[tuple[str, str]] = []
    pos = 0
    while pos < len(text):
        m = _TOKEN.match(text, pos)
        if m is None:
            raise ConfigParseError(f"{source}: cannot parse near {text[pos:pos + 30]!r}")
        pos = m.end()
        if m.lastgroup:
            tokens.append((m.lastgroup, m.group(m.lastgroup)))
    return _Parser(tokens, source).message(end=None)


class _Parser:
    """Recursive descent over the tokens: a message is fields up to its closing brace, a
    field a name and a value (a message, a ``[ ... ]`` list or a scalar)."""

    def __init__(self, tokens: list[tuple[str, str]], source: str):
        self.tokens, self.i, self.source = tokens, 0, source

    def peek(self) -> tuple[str, str] | None:
        return self.tokens[self.i] if self.i < len(self.tokens) else None

    def take(self) -> tuple[str, str]:
        tok = self.peek()
        if tok is None:
            raise ConfigParseError(f"{self.source}: unexpected end of file")
        self.i += 1
        return tok

    def fail(self, what: str) -> ConfigParseError:
        near = " ".join(t[1] for t in self.tokens[max(0, self.i - 3): self.i + 3])
        return ConfigParseError(f"{self.source}: {what} near {near!r}")

    def message(self, end: str | None) -> dict[str, Any]:
        out: dict[str, Any] = {}
        while True:
            tok = self.peek()
            if tok is None:
                if end is not None:
                    raise self.fail(f"missing {end!r}")
                return out
            if tok[0] == "punct" and tok[1] in ("}", ">"):
                if end is None or tok[1] != end:
                    raise self.fail(f"unexpected {tok[1]!r}")
                self.take()
                return out
            if tok[0] == "punct" and tok[1] in (",", ";"):
                self.take()
                continue
            if tok[0] != "word":
                raise self.fail("expected a field name")
            key = self.take()[1]
            value = self.value()
            if key in _REPEATED:
                values = value if isinstance(value, list) else [value]
                out.setdefault(key, []).extend(values)
            elif key in out:  # a repeated field we did not list: keep every entry
                prev = out[key]
                out[key] = (prev if isinstance(prev, list) else [prev]) + (value if isinstance(value, list) else [value])
            else:
                out[key] = value

    def value(self) -> Any:
        tok = self.peek()
        if tok == ("punct", ":"):
            self.take()
            tok = self.peek()
        if tok is None:
            raise self.fail("missing value")
        if tok[0] == "punct" and tok[1] in ("{", "<"):
            self.take()
            return self.message(end="}" if tok[1] == "{" else ">")
        if tok == ("punct", "["):
            self.take()
            items = []
            while self.peek() != ("punct", "]"):
                if self.peek() == ("punct", ","):
                    self.take()
                    continue
                items.append(self.value())
            self.take()
            return items
        return self.scalar()

    def scalar(self) -> Any:
        kind, text = self.take()
        if kind == "str":
            s = text[1:-1]
            # Adjacent string literals concatenate, as in protobuf.
            while self.peek() is not None and self.peek()[0] == "str":
                s += self.take()[1][1:-1]
            return bytes(s, "utf-8").decode("unicode_escape") if "\\" in s else s
        if kind != "word":
            raise self.fail(f"unexpected {text!r}")
        try:
            return int(text, 0)
        except ValueError:
            pass
        try:
            return float(text)
        except ValueError:
            return Word(text)


def format_pbtxt(message: dict[str, Any]) -> str:
    """Write nested dicts (as :func:`parse_pbtxt` returns them) as protobuf text format.

    One top-level field per line; a repeated message field as a ``[ ... ]`` list with one
    message per line; nested messages inline. Strings are quoted and escaped, :class:`Word`
    identifiers are not, numbers are written as Python writes them.
    """
    lines = []
    for key, value in message.items():
        if isinstance(value, list) and value and all(isinstance(v, dict) for v in value):
            items = ",\n".join(f"  {_message(v)}" for v in value)
            lines.append(f"{key} [\n{items}\n]")
        else:
            lines.append(_field(key, value))
    return "\n".join(lines) + "\n"


def _field(key: str, value: Any) -> str:
    if isinstance(value, dict):
        return f"{key} {_message(value)}"
    if isinstance(value, list) and value and all(isinstance(v, dict) for v in value):
        return f"{key} [ {', '.join(_message(v) for v in value)} ]"
    return f"{key}: {_scalar(value)}"


def _message(message: dict[str, Any]) -> str:
    return "{ " + " ".join(_field(k, v) for k, v in message.items()) + " }" if message else "{ }"


def _scalar(value: Any) -> str:
    if isinstance(value, list):
        return "[ " + ", ".join(_scalar(v) for v in value) + " ]"
    if isinstance(value, Word) or isinstance(value, bool):
        return str(value).lower() if isinstance(value, bool) else str(value)
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, str):
        escaped = value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")
        return f'"{escaped}"'
    raise TypeError(f"cannot write {type(value).__name__} {value!r} as protobuf text")
