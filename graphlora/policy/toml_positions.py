"""Where each key of a TOML policy is written: a line scanner, and the TOML reader built on it.

``tomllib`` reads a TOML document's values but reports no positions, and no TOML library reports where a
key is written, so :class:`TomlLineScanner` walks the text itself: it reads a document and writes a table
``key path -> line`` and the list of keys written twice; it checks no syntax beyond what it needs to follow
the structure (tomllib does that) and raises :class:`TomlScanError` where it cannot follow it.

:func:`read_toml` reads a policy file's text into (values, lines, broken) like the YAML reader: values from
tomllib, lines from the scanner. A syntax error becomes one located issue, or, when the scanner finds a key
written twice, an issue naming the line of its first definition.
"""

from __future__ import annotations

import bisect
import re
import tomllib
from typing import Any

from graphlora.policy.key_paths import KeyPath
from graphlora.policy.messages import Abort, Issues

__all__ = ["TomlLineScanner", "TomlScanError", "read_toml"]


class TomlScanError(Exception):
    """The text is not TOML the scanner can follow (it assumes a document tomllib has accepted)."""


_TOML_BARE_KEY = re.compile(r"[A-Za-z0-9_-]+")
_TOML_BASIC_KEY = re.compile(r'"(?:[^"\\\n]|\\.)*"')
_TOML_SCALAR = re.compile(r"[^,\]}\n#]*")


class TomlLineScanner:
    """Map the key paths of a (valid) TOML document to the line where each is written.

    Handles tables, arrays of tables (``[[rules]]`` gives ``rules[0]``, ``rules[1]`` ...; a later
    ``[rules.match]`` belongs to the last ``rules`` entry), dotted and quoted keys, inline tables and
    arrays (each element at the line where it starts), and every string form. A table's line is the line of
    its header, or of the first key that creates it implicitly. ``duplicates`` lists keys written twice.
    """

    def __init__(self, text: str) -> None:
        self.s = text
        self.n = len(text)
        self.i = 0
        self._newlines = [m.start() for m in re.finditer("\n", text)]
        self.lines: dict[KeyPath, int] = {(): 1}
        self.duplicates: list[tuple[int, KeyPath, int]] = []  # (line, key path, line of the first definition)
        self._defined: dict[KeyPath, int] = {}  # key/value pairs and [table] headers
        self._aot: dict[KeyPath, int] = {}  # array-of-tables path -> number of entries so far

    def line_at(self, pos: int) -> int:
        return bisect.bisect_left(self._newlines, pos) + 1

    # -- low-level --------------------------------------------------------------------------------
    def _peek(self, k: int = 0) -> str:
        j = self.i + k
        return self.s[j] if j < self.n else ""

    def _skip_ws(self) -> None:
        while self.i < self.n and self.s[self.i] in " \t":
            self.i += 1

    def _skip_blank(self) -> None:  # whitespace, newlines, comments
        while self.i < self.n:
            c = self.s[self.i]
            if c in " \t\r\n":
                self.i += 1
            elif c == "#":
                j = self.s.find("\n", self.i)
                self.i = self.n if j < 0 else j
            else:
                return

    def _expect(self, token: str) -> None:
        if not self.s.startswith(token, self.i):
            raise TomlScanError(f"expected {token!r} at line {self.line_at(self.i)}")
        self.i += len(token)

    def _key(self) -> list[str]:
        parts: list[str] = []
        while True:
            self._skip_ws()
            c = self._peek()
            if c == '"':
                m = _TOML_BASIC_KEY.match(self.s, self.i)
                if not m:
                    raise TomlScanError("bad quoted key")
                parts.append(tomllib.loads(f"k = {m.group()}")["k"])  # exact unescaping
                self.i = m.end()
            elif c == "'":
                j = self.s.find("'", self.i + 1)
                if j < 0:
                    raise TomlScanError("bad literal key")
                parts.append(self.s[self.i + 1 : j])
                self.i = j + 1
            else:
                m = _TOML_BARE_KEY.match(self.s, self.i)
                if not m:
                    raise TomlScanError(f"expected a key at line {self.line_at(self.i)}")
                parts.append(m.group())
                self.i = m.end()
            self._skip_ws()
            if self._peek() != ".":
                return parts
            self.i += 1

    def _multiline_string(self, quote: str) -> None:
        delim = quote * 3
        j = self.i + 3
        while True:
            if j >= self.n:
                raise TomlScanError("unterminated string")
            if quote == '"' and self.s[j] == "\\":
                j += 2
            elif self.s.startswith(delim, j):
                k = j + 3
                while k < self.n and self.s[k] == quote and k - j < 5:  # up to two quotes end the content
                    k += 1
                self.i = k
                return
            else:
                j += 1

    def _string(self) -> None:
        c = self._peek()
        if self.s.startswith(c * 3, self.i):
            self._multiline_string(c)
            return
        j = self.i + 1
        while j < self.n and self.s[j] != c:
            j += 2 if (c == '"' and self.s[j] == "\\") else 1
        self.i = j + 1

    # -- structure --------------------------------------------------------------------------------
    def _define(self, path: KeyPath, line: int) -> None:
        if path in self._defined:
            self.duplicates.append((line, path, self._defined[path]))
        else:
            self._defined[path] = line
            self.lines[path] = line

    def _pair(self, base: KeyPath, keys: list[str], line: int) -> None:
        path = base
        for k in keys[:-1]:
            path += (k,)
            self.lines.setdefault(path, line)
        path += (keys[-1],)
        self._define(path, line)
        self._skip_ws()
        self._expect("=")
        self._skip_ws()
        self._value(path)

    def _value(self, path: KeyPath) -> None:
        c = self._peek()
        if c == "[":
            self.i += 1
            index = 0
            while True:
                self._skip_blank()
                if self._peek() == "]":
                    self.i += 1
                    return
                self.lines.setdefault(path + (index,), self.line_at(self.i))
                self._value(path + (index,))
                index += 1
                self._skip_blank()
                if self._peek() == ",":
                    self.i += 1
                elif self._peek() == "]":
                    self.i += 1
                    return
                else:
                    raise TomlScanError(f"bad array at line {self.line_at(self.i)}")
        elif c == "{":
            self.i += 1
            while True:
                self._skip_blank()
                if self._peek() == "}":
                    self.i += 1
                    return
                line = self.line_at(self.i)
                self._pair(path, self._key(), line)
                self._skip_blank()
                if self._peek() == ",":
                    self.i += 1
                elif self._peek() == "}":
                    self.i += 1
                    return
                else:
                    raise TomlScanError(f"bad inline table at line {self.line_at(self.i)}")
        elif c in "\"'":
            self._string()
        else:
            m = _TOML_SCALAR.match(self.s, self.i)
            if not m or not m.group().strip():
                raise TomlScanError(f"expected a value at line {self.line_at(self.i)}")
            self.i = m.end()

    def _header(self, keys: list[str], line: int, array: bool) -> KeyPath:
        path: KeyPath = ()
        for k in keys[:-1]:
            path += (k,)
            self.lines.setdefault(path, line)
            if path in self._aot:
                path += (self._aot[path] - 1,)
        path += (keys[-1],)
        if array:
            if path in self._defined:  # `rules = [...]` then `[[rules]]`
                self.duplicates.append((line, path, self._defined[path]))
            self.lines.setdefault(path, line)
            index = self._aot.get(path, 0)
            self._aot[path] = index + 1
            path += (index,)
            self.lines[path] = line
        else:
            self._define(path, line)
        return path

    def scan(self) -> "TomlLineScanner":
        table: KeyPath = ()
        while True:
            self._skip_blank()
            if self.i >= self.n:
                return self
            line = self.line_at(self.i)
            if self.s.startswith("[[", self.i):
                self.i += 2
                keys = self._key()
                self._expect("]]")
                table = self._header(keys, line, array=True)
            elif self._peek() == "[":
                self.i += 1
                keys = self._key()
                self._expect("]")
                table = self._header(keys, line, array=False)
            else:
                self._pair(table, self._key(), line)


_TOML_POSITION = re.compile(r"\s*\(at line (\d+), column \d+\)|\s*\(at end of document\)")


def read_toml(text: str, display: str, issues: Issues) -> tuple[Any, dict[KeyPath, int], set[KeyPath]]:
    """(values, key path -> line, no broken paths) of a TOML document; a syntax error or a key written twice
    goes to ``issues`` under the name ``display`` and raises :class:`Abort`."""
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        try:
            duplicates = TomlLineScanner(text).scan().duplicates
        except Exception:  # the scanner assumes valid TOML; on broken input it may give up
            duplicates = []
        for line, path, first in duplicates[:1]:  # like tomllib, stop at the first: later ones may follow from it
            issues.add(display, line, path, f"duplicate key {path[-1]!r} (first defined on line {first})")
        if not duplicates:
            message = str(e)
            m = re.search(r"\(at line (\d+), column \d+\)", message)
            line = int(m.group(1)) if m else (text.count("\n") + 1 if "end of document" in message else None)
            problem = _TOML_POSITION.sub("", message)
            issues.add(display, line, None, "syntax error: " + problem[:1].lower() + problem[1:])
        raise Abort from None
    try:
        lines = TomlLineScanner(text).scan().lines
    except Exception:  # pragma: no cover - a scanner bug must not hide the policy: messages lose lines
        lines = {}
    return data, lines, set()
