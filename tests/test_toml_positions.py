"""The TOML key-position scanner (graphlora/policy/toml_positions.py), tested on its own: the line of every
key path of tables, dotted and quoted keys, arrays of tables, inline tables and arrays, strings that hide
key-like text, comments, keys written twice, and input it cannot follow."""

from __future__ import annotations

import textwrap
import tomllib

import pytest

from graphlora.policy.toml_positions import TomlLineScanner, TomlScanError


def scan(text: str) -> TomlLineScanner:
    return TomlLineScanner(textwrap.dedent(text)).scan()


def _paths(value, path=()):
    """Every key path of a tomllib value (tables and arrays, down to the leaves)."""
    yield path
    if isinstance(value, dict):
        for k, v in value.items():
            yield from _paths(v, path + (k,))
    elif isinstance(value, list):
        for i, v in enumerate(value):
            yield from _paths(v, path + (i,))


def test_empty_document_has_only_the_root():
    assert scan("").lines == {(): 1}
    assert scan("# only a comment\n\n").lines == {(): 1}


def test_table_headers_and_their_keys():
    lines = scan(
        """\
        # a comment that looks like a header: [not.a.table]
        r = 8  # a comment with = and [brackets]

        [tool]
        name = "x"

        [tool.sub]
        deep = 1
        """
    ).lines
    assert lines == {
        (): 1,
        ("r",): 2,
        ("tool",): 4,
        ("tool", "name"): 5,
        ("tool", "sub"): 7,
        ("tool", "sub", "deep"): 8,
    }


def test_dotted_and_quoted_keys():
    lines = scan(
        """\
        a.b.c = 1
        a.b.d = 2
        "quoted.key".x = 3
        'literal'.y = 4
        site . "q k" = 5
        "esc\\u0041ped" = 6
        """
    ).lines
    # a table created by a dotted key is at the line of the first key that creates it
    assert lines[("a",)] == lines[("a", "b")] == lines[("a", "b", "c")] == 1
    assert lines[("a", "b", "d")] == 2
    assert lines[("quoted.key", "x")] == 3 and ("quoted",) not in lines
    assert lines[("literal", "y")] == 4
    assert lines[("site", "q k")] == 5
    assert lines[("escAped",)] == 6  # quoted keys are unescaped as TOML does


def test_arrays_of_tables_number_their_entries():
    lines = scan(
        """\
        [[rules]]
        r = 1
        [rules.match]
        component = "vision"

        [[rules]]
        match = { role = "attn.q" }

        [[x]]
        [[x.y]]
        z = 1
        [[x.y]]
        z = 2
        [[x]]
        [[x.y]]
        z = 3
        """
    ).lines
    assert lines[("rules",)] == lines[("rules", 0)] == 1
    assert lines[("rules", 0, "r")] == 2
    assert lines[("rules", 0, "match")] == 3  # a later [rules.match] belongs to the last [[rules]]
    assert lines[("rules", 0, "match", "component")] == 4
    assert lines[("rules", 1)] == 6 and lines[("rules", 1, "match", "role")] == 7
    assert lines[("x", 0, "y", 0, "z")] == 11
    assert lines[("x", 0, "y", 1, "z")] == 13
    assert lines[("x", 1)] == 14 and lines[("x", 1, "y", 0, "z")] == 16
    assert ("rules", 2) not in lines and ("x", 0, "y", 2) not in lines


def test_inline_tables_and_arrays_give_each_element_its_line():
    lines = scan(
        """\
        m = { a = 1, b = { c = [ { d = 1 },
          { e = 2 } ] } }
        arr = [
          1,  # one, then a nested array
          [2, 3],
          "four",
        ]
        empty = []
        none = {}
        """
    ).lines
    assert lines[("m", "a")] == lines[("m", "b", "c", 0, "d")] == 1
    assert lines[("m", "b", "c", 1)] == lines[("m", "b", "c", 1, "e")] == 2
    assert lines[("arr",)] == 3
    assert [lines[("arr", i)] for i in range(3)] == [4, 5, 6]
    assert lines[("arr", 1, 1)] == 5
    assert lines[("empty",)] == 8 and ("empty", 0) not in lines
    assert lines[("none",)] == 9


def test_strings_and_comments_hide_what_looks_like_keys():
    lines = scan(
        '''\
        s = """
        [[fake]]
        x = 1 \\"""
        """
        t = \'\'\'
        [also.fake]
        \'\'\'
        u = """a""\"""
        v = "a # b [c] = d"
        w = 'e # f'
        after = 1 # [fake.too]
        '''
    ).lines
    assert lines == {(): 1, ("s",): 1, ("t",): 5, ("u",): 8, ("v",): 9, ("w",): 10, ("after",): 11}


def test_windows_line_endings_count_the_same_lines():
    text = "r = 1\r\n\r\n[t]\r\nk = 'v'\r\n"
    assert TomlLineScanner(text).scan().lines == {(): 1, ("r",): 1, ("t",): 3, ("t", "k"): 4}


def test_duplicates_name_the_line_of_the_first_definition():
    s = scan(
        """\
        a = 1
        a = 2
        rules = [1]
        [t]
        [t]
        [[rules]]
        """
    )
    assert s.duplicates == [(2, ("a",), 1), (5, ("t",), 4), (6, ("rules",), 3)]
    assert s.lines[("a",)] == 1 and s.lines[("t",)] == 4  # the first definition keeps its line


def test_every_key_path_tomllib_reads_has_a_line():
    text = textwrap.dedent(
        """\
        version = 1
        target_modules = ["q_proj", "v_proj"]
        language_layers = [
            0,
            1,
        ]
        site.name = "x"

        [[rules]]
        r = 32

        [rules.match]
        component = "vision"
        layers = [0, 1]

        [[rules]]
        match = { role = ["mlp.up", "mlp.down"], name = 'a\\.b' }
        target = false
        """
    )
    lines = TomlLineScanner(text).scan().lines
    missing = [p for p in _paths(tomllib.loads(text)) if p not in lines]
    assert not missing
    # and each line holds the last key of its path (or, for a list element, is inside its list)
    rows = text.splitlines()
    for path, line in lines.items():
        if path and isinstance(path[-1], str):
            assert path[-1] in rows[line - 1], (path, line)


@pytest.mark.parametrize(
    "text, message",
    [
        ("= 1\n", "expected a key at line 1"),
        ("a = ,\n", "expected a value at line 1"),
        ("[t\n", "expected ']' at line 1"),
        ("[[t]\n", "expected ']]' at line 1"),
        ("a = b\nc d\n", "expected '=' at line 2"),
        ("a = [1, 2\n", "bad array at line 2"),
        ("a = { b = 1 ]\n", "bad inline table at line 1"),
        ('x = """abc\n', "unterminated string"),
        ('"k = 1\n', "bad quoted key"),
        ("'k = 1\n", "bad literal key"),
    ],
)
def test_malformed_input_raises_scan_error(text, message):
    with pytest.raises(TomlScanError, match="^" + message.replace("[", r"\[") + "$"):
        TomlLineScanner(text).scan()
