"""Policy files: YAML / TOML reading, located errors, extends, presets, round trips, schema, site diffs."""

from __future__ import annotations

import json
import os
import re
import textwrap
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from graphlora.errors import PolicyError
from graphlora.labels import COMPONENTS, ROLES
from graphlora.policy import (
    SCHEMA_PATH,
    Policy,
    PolicyFileError,
    Rule,
    RuleMatch,
    TomlLineScanner,
    as_policy,
    dump_policy,
    format_key_path,
    format_site_diff,
    load_policy,
    load_policy_file,
    load_policy_source,
    load_preset,
    parse_key_path,
    parse_policy_text,
    policy_json_schema,
    preset_names,
    write_policy_schema,
)

DATA = Path(__file__).parent / "data" / "policies"
BAD = DATA / "bad"
REPO = Path(__file__).resolve().parents[1]
DOCS = REPO / "docs" / "policy.md"

PROPERTY_SETTINGS = settings(
    deadline=None,
    derandomize=os.environ.get("CI") == "true",
    max_examples=100,
    suppress_health_check=[HealthCheck.too_slow],
)


def _error_lines(path: Path | str) -> list[str]:
    with pytest.raises(PolicyFileError) as info:
        load_policy_file(path)
    return str(info.value).splitlines()


# ---------------------------------------------------------------------------------------------------
# Bad files: each states its expected messages in "# expect:" lines at the top
# ---------------------------------------------------------------------------------------------------
BAD_FILES = sorted(p for p in BAD.iterdir() if p.suffix in (".yaml", ".yml", ".toml"))


def _expected(path: Path) -> list[str]:
    lines = [line[len("# expect: ") :] for line in path.read_text().splitlines() if line.startswith("# expect: ")]
    return [line.replace("{file}", str(path)).replace("{dir}", str(path.parent)) for line in lines]


def test_there_are_enough_bad_files():
    assert len(BAD_FILES) >= 30
    assert {p.suffix for p in BAD_FILES} == {".yaml", ".toml"}
    assert all(_expected(p) for p in BAD_FILES), [p.name for p in BAD_FILES if not _expected(p)]


@pytest.mark.parametrize("path", BAD_FILES, ids=lambda p: p.name)
def test_bad_file_messages(path):
    with pytest.raises(PolicyFileError) as info:
        load_policy_file(path)
    err = info.value
    assert str(err).splitlines() == _expected(path)
    assert isinstance(err, PolicyError)
    # every line is FILE:LINE: ...; key_path is the first problem's key path (None for syntax errors)
    first = err.issues[0]
    assert err.key_path == first.key_path
    assert all(issue.line is not None for issue in err.issues)
    m = re.match(r"^(.*?):(\d+): (?:(\S+): )?", str(err))
    assert m and int(m.group(2)) == first.line


def test_error_message_names_file_line_and_key_path(tmp_path):
    f = tmp_path / "policy.yaml"
    f.write_text("r: 16\nrules:\n  - match: {component: vision}\n    r: 32\n  - match:\n      component: language\n"
                 "      layers: 'a:b'\n")
    (line,) = _error_lines(f)
    assert line.startswith(f"{f}:7: rules[1].match.layers: bad layer range 'a:b': expected ")
    with pytest.raises(PolicyError) as info:
        load_policy_file(f)
    assert info.value.key_path == "rules[1].match.layers"


def test_all_errors_are_reported_in_line_order(tmp_path):
    f = tmp_path / "p.toml"
    f.write_text('lora_dtype = "fp32"\nr = 0\nfinetune_projector = "on"\n[[rules]]\nmatch = {}\n[[rules]]\nr = 2\n')
    lines = _error_lines(f)
    assert [int(line.split(":")[1]) for line in lines] == [1, 2, 3, 5, 6]
    assert lines[3].endswith("rules[0].match: a rule's match needs at least one of: component, role, layers, name")
    assert lines[4].endswith("rules[1].match: missing required key 'match'")


def test_unreadable_and_unknown_files(tmp_path):
    missing = tmp_path / "nope.yaml"
    (line,) = _error_lines(missing)
    assert line == f"{missing}: cannot read policy file: No such file or directory"
    other = tmp_path / "policy.json"
    other.write_text("{}")
    (line,) = _error_lines(other)
    assert line == f"{other}: unknown policy file type '.json': use .yaml, .yml or .toml"
    binary = tmp_path / "b.yaml"
    binary.write_bytes(b"r: \xff\n")
    assert _error_lines(binary)[0].startswith(f"{binary}: cannot read policy file: not UTF-8 text")


# ---------------------------------------------------------------------------------------------------
# Strict YAML
# ---------------------------------------------------------------------------------------------------
def test_yaml_plain_scalars_follow_yaml_1_2():
    text = textwrap.dedent(
        """\
        target_modules: [on, off, yes, no, y, n, True, FALSE, 1:30, 2024-01-01, '=', ~x]
        random_state: 0x1F
        r: 010
        lora_alpha: 1e3
        lora_dropout: .5e-1
        vision_layers: 1:8:2
        language_layers: ~
        finetune_cross_attention: null
        """
    )
    p = parse_policy_text(text, "yaml").policy
    assert p.target_modules == ["on", "off", "yes", "no", "y", "n", "True", "FALSE", "1:30", "2024-01-01",
                                "=", "~x"]
    assert (p.random_state, p.r, p.lora_alpha, p.lora_dropout) == (31, 10, 1000.0, 0.05)
    assert p.vision_layers == "1:8:2" and p.language_layers is None and p.finetune_cross_attention is None


def test_yaml_null_only_where_optional():
    with pytest.raises(PolicyFileError) as info:
        parse_policy_text("vision_layers: null\nlora_dtype: null\n", "yaml", name="p.yaml")
    assert str(info.value) == "p.yaml:2: lora_dtype: expected one of 'float32', 'bfloat16', 'float16', got null"


def test_yaml_aliases_are_followed_and_recursion_is_refused():
    p = load_policy_file(DATA / "yaml_forms.yaml")
    assert p.rules[2].match == p.rules[0].match == RuleMatch(component="vision", layers=[0, 1])
    with pytest.raises(PolicyFileError) as info:
        parse_policy_text("modules_to_save: &a [x, *a]\n", "yaml", name="p.yaml")
    assert str(info.value) == "p.yaml:1: modules_to_save[1]: recursive YAML alias"


def test_yaml_bomb_is_refused():
    lines = ["a0: &a0 [x, x, x, x, x, x, x, x, x, x]"]
    lines += [f"a{i}: &a{i} [" + ", ".join([f"*a{i - 1}"] * 10) + "]" for i in range(1, 7)]
    with pytest.raises(PolicyFileError) as info:
        parse_policy_text("\n".join(lines) + "\n", "yaml", name="p.yaml")
    assert "the document is too large" in str(info.value)


# ---------------------------------------------------------------------------------------------------
# TOML line scanner
# ---------------------------------------------------------------------------------------------------
def test_toml_scanner_tables_inline_tables_arrays_of_tables_dotted_keys():
    lines = TomlLineScanner((DATA / "toml_forms.toml").read_text()).scan().lines
    expected = {
        ("version",): 2,
        ("r",): 3,
        ("target_modules",): 5,
        ("modules_to_save",): 7,
        ("modules_to_save", 1): 9,
        ("language_layers", 2): 12,
        ("rules",): 14,
        ("rules", 0): 14,
        ("rules", 0, "match"): 15,
        ("rules", 0, "match", "layers", 1): 15,
        ("rules", 0, "r"): 16,
        ("rules", 1): 18,
        ("rules", 1, "match"): 19,
        ("rules", 1, "match", "name"): 20,
        ("rules", 1, "alpha"): 21,
        ("rules", 2): 23,
        ("rules", 2, "r"): 24,
        ("rules", 2, "match"): 25,
        ("rules", 2, "match", "layers"): 27,
    }
    assert {k: lines.get(k) for k in expected} == expected


def test_toml_scanner_nested_arrays_of_tables_and_strings():
    text = textwrap.dedent(
        """\
        a = "x = 1 # not a comment [[fake]]"
        b = '''
        [[also.fake]]
        '''
        [t.'quoted.key']
        "c d" = { e = [ { f = 1 }, { g = 2 } ] }
        [[x]]
        [[x.y]]
        z = 1
        [[x.y]]
        z = 2
        [[x]]
        [[x.y]]
        z = 3
        """
    )
    lines = TomlLineScanner(text).scan().lines
    assert lines[("b",)] == 2 and ("also",) not in lines and ("fake",) not in lines
    assert lines[("t", "quoted.key", "c d", "e", 1, "g")] == 6
    assert lines[("x", 0, "y", 1, "z")] == 11
    assert lines[("x", 1, "y", 0, "z")] == 14


# ---------------------------------------------------------------------------------------------------
# Good files, both syntaxes
# ---------------------------------------------------------------------------------------------------
EVERY_KEY = Policy(
    r=8,
    lora_alpha=16.5,
    lora_dropout=0.05,
    target_modules=["q_proj", "k_proj", "v_proj", "o_proj"],
    finetune_vision_layers=False,
    finetune_mlp_modules=False,
    finetune_projector=True,
    finetune_cross_attention=False,
    vision_layers=[0, -1],
    language_layers="::2",
    use_rslora=True,
    random_state=42,
    modules_to_save=["lm_head", "embed_tokens"],
    lora_dtype="bfloat16",
    rules=[
        Rule(
            match=RuleMatch(component=["vision", "projector"], role="attn.q", layers="-2:", name=r"model\.visual\..*"),
            target=True,
            r=64,
            alpha=128.0,
            dropout=0.1,
            allow_unmatched=True,
        ),
        Rule(match=RuleMatch(role=["mlp.up", "mlp.down"]), target=False),
    ],
)


@pytest.mark.parametrize("name", ["every_key.yaml", "every_key.toml"])
def test_every_key(name):
    assert load_policy_file(DATA / name) == EVERY_KEY
    assert load_policy(DATA / name) == EVERY_KEY  # graphlora.load_policy is this function
    assert as_policy(str(DATA / name)) == EVERY_KEY


@pytest.mark.parametrize("name", ["empty.yaml", "empty.toml"])
def test_empty_file_is_the_default_policy(name):
    assert load_policy_file(DATA / name) == Policy()
    assert parse_policy_text("---\n", "yaml").policy == Policy()


def test_yaml_and_toml_forms_agree():
    t = load_policy_file(DATA / "toml_forms.toml")
    assert t.target_modules == r"model\.language_model\..*" and t.lora_alpha == 32.0
    assert t.modules_to_save == ["lm_head", "embed_tokens"] and t.language_layers == [0, 1, 2]
    assert [r.match.model_dump(exclude_none=True) for r in t.rules] == [
        {"component": "vision", "layers": [0, 1]},
        {"role": "attn.q", "name": ".*q_proj"},
        {"component": "language", "layers": "-2:"},
    ]
    y = load_policy_file(DATA / "yaml_forms.yaml")
    assert (y.target_modules, y.modules_to_save, y.language_layers) == (t.target_modules, t.modules_to_save, [0, 1, 2])


# ---------------------------------------------------------------------------------------------------
# extends: merging, provenance, locate
# ---------------------------------------------------------------------------------------------------
def test_extends_chain_merges_key_by_key_and_concatenates_rules():
    source = load_policy_source(DATA / "nested" / "grandchild.yml")
    p = source.policy
    full = load_preset("full-vlm")
    # keys: the nearest file that sets a key wins
    assert p.r == 8  # child.yaml (base and full-vlm say 16)
    assert p.lora_alpha == 32.0 and p.finetune_projector  # base.toml
    assert not p.finetune_vision_layers  # child.yaml overrides full-vlm
    assert p.language_layers == "-8:"  # grandchild.yml
    assert p.finetune_mlp_modules == full.finetune_mlp_modules and p.target_modules == "all-linear"  # preset
    # rules: parent's first
    assert [r.match.model_dump(exclude_none=True) for r in p.rules] == [
        {"component": "vision", "role": ["mlp.up", "mlp.down"]},  # base.toml
        {"component": "projector"},  # child.yaml
        {"role": "attn.o"},  # grandchild.yml
    ]
    assert source.files == [
        (DATA / "nested" / "grandchild.yml").resolve(),
        (DATA / "child.yaml").resolve(),
        (DATA / "base.toml").resolve(),
        (REPO / "graphlora" / "presets" / "full-vlm.yaml").resolve(),
    ]


def test_locate_points_at_the_file_that_defined_the_key():
    source = load_policy_source(DATA / "nested" / "grandchild.yml")
    d = str(DATA)
    preset = str((REPO / "graphlora" / "presets" / "full-vlm.yaml").resolve())
    assert source.locate("r") == f"{d}/child.yaml:3"
    assert source.locate("lora_alpha") == f"{d}/base.toml:3"
    assert source.locate("finetune_mlp_modules") == f"{preset}:13"
    assert source.locate("language_layers") == f"{d}/nested/grandchild.yml:3"
    assert source.locate("rules[0]") == f"{d}/base.toml:6"
    assert source.locate("rules[0].match.role") == f"{d}/base.toml:7"
    assert source.locate("rules[0].r") == f"{d}/base.toml:8"
    assert source.locate("rules[1]") == f"{d}/child.yaml:6"
    assert source.locate("rules[2].target") == f"{d}/nested/grandchild.yml:6"
    assert source.locate("rules[2].match.layers") == f"{d}/nested/grandchild.yml:5"  # nearest written ancestor
    assert source.locate(("rules", 1, "r")) == f"{d}/child.yaml:7"
    assert source.locate("extends") == f"{d}/nested/grandchild.yml:2"
    assert source.locate("use_rslora") is None  # a default: written nowhere
    assert source.locate("rules[3]") is None
    assert source.locate("rules[") is None


def test_locate_in_toml_arrays_of_tables():
    source = load_policy_source(DATA / "toml_forms.toml")
    f = DATA / "toml_forms.toml"
    assert source.locate("rules[2]") == f"{f}:23"
    assert source.locate("rules[2].match") == f"{f}:25"
    assert source.locate("rules[1].match.name") == f"{f}:20"
    assert source.locate("r") == f"{f}:3"
    assert source.locate("version") == f"{f}:2"
    assert load_policy_source(DATA / "yaml_forms.yaml").locate("version") is None  # not written


def test_extends_a_preset_by_name_and_a_child_rule_wins(tmp_path):
    f = tmp_path / "mine.toml"
    f.write_text('extends = "vision-only"\nlora_alpha = 64\n[[rules]]\nmatch.layers = "-2:"\nr = 64\n')
    p = load_policy_file(f)
    assert p == load_preset("vision-only").model_copy(
        update={"lora_alpha": 64.0, "rules": [Rule(match=RuleMatch(layers="-2:"), r=64)]}
    )


def test_empty_child_rules_add_nothing(tmp_path):
    (tmp_path / "parent.yaml").write_text("rules:\n  - match: {component: vision}\n    r: 32\n")
    (tmp_path / "child.yaml").write_text("extends: parent.yaml\nrules: []\n")
    assert load_policy_file(tmp_path / "child.yaml").rules == [
        Rule(match=RuleMatch(component="vision"), r=32)
    ]  # an empty list adds nothing (concatenation)


# ---------------------------------------------------------------------------------------------------
# Presets
# ---------------------------------------------------------------------------------------------------
def test_presets():
    assert preset_names() == ["full-vlm", "language-only", "projector-and-language", "vision-only"]
    base = {"lora_alpha": 16.0, "finetune_attention_modules": True, "finetune_mlp_modules": True,
            "target_modules": "all-linear", "rules": []}
    expect = {
        "language-only": dict(r=16, finetune_vision_layers=False, finetune_language_layers=True,
                              finetune_projector=False),
        "vision-only": dict(r=32, finetune_vision_layers=True, finetune_language_layers=False,
                            finetune_projector=False),
        "full-vlm": dict(r=16, finetune_vision_layers=True, finetune_language_layers=True, finetune_projector=False),
        "projector-and-language": dict(r=16, finetune_vision_layers=False, finetune_language_layers=True,
                                       finetune_projector=True),
    }
    for name, fields in expect.items():
        assert load_preset(name) == Policy(**base, **fields), name
    with pytest.raises(PolicyError, match=r"unknown preset 'full' .*did you mean 'full-vlm'"):
        load_preset("full")


# ---------------------------------------------------------------------------------------------------
# Writing: Policy -> YAML / TOML -> Policy
# ---------------------------------------------------------------------------------------------------
_TEXT = st.text(alphabet=st.characters(blacklist_categories=("Cs",)), max_size=12)
_NAME = st.text(alphabet="abcdefghijklmnopqrstuvwxyz_.0123456789", min_size=1, max_size=16)


def _regex_ok(s: str) -> bool:
    try:
        re.compile(s)
    except re.error:
        return False
    return True


_REGEX = st.one_of(
    st.sampled_from([r"model\.language_model\..*", r".*\.(q|k|v)_proj", "a'b\"c", r"\d+\\", "x: y #z", "-4:"]),
    _TEXT.filter(_regex_ok),
)
_BOUND = st.one_of(st.just(""), st.integers(-40, 40).map(str))
_SLICE = st.builds(
    lambda start, stop, step, sp: f"{start}{sp}:{sp}{stop}" + ("" if step is None else f"{sp}:{sp}{step}"),
    _BOUND,
    _BOUND,
    st.none() | st.just("") | st.integers(-8, 8).filter(bool).map(str),
    st.sampled_from(["", " "]),
)
_LAYERS = st.one_of(st.lists(st.integers(-64, 64), max_size=5), _SLICE)
_POS_FLOAT = st.floats(min_value=0, exclude_min=True, allow_nan=False, allow_infinity=False)
_DROPOUT = st.floats(min_value=0, max_value=1, exclude_max=True, allow_nan=False)


def _one_or_list(values):
    return st.one_of(st.none(), st.sampled_from(values), st.lists(st.sampled_from(values), min_size=1, max_size=3))


_MATCH = (
    st.fixed_dictionaries(
        {
            "component": _one_or_list(COMPONENTS),
            "role": _one_or_list(ROLES),
            "layers": st.none() | _LAYERS,
            "name": st.none() | _REGEX,
        }
    )
    .filter(lambda d: any(v is not None for v in d.values()))
    .map(lambda d: RuleMatch(**d))
)
_RULE = st.builds(
    Rule,
    match=_MATCH,
    target=st.none() | st.booleans(),
    r=st.none() | st.integers(1, 2**20),
    alpha=st.none() | _POS_FLOAT,
    dropout=st.none() | _DROPOUT,
    allow_unmatched=st.booleans(),
)
POLICIES = st.builds(
    Policy,
    r=st.integers(1, 2**31),
    lora_alpha=_POS_FLOAT,
    lora_dropout=_DROPOUT,
    target_modules=st.one_of(st.just("all-linear"), _REGEX, st.lists(_NAME | _TEXT.filter(bool), min_size=1,
                                                                       max_size=4)),
    finetune_vision_layers=st.booleans(),
    finetune_language_layers=st.booleans(),
    finetune_attention_modules=st.booleans(),
    finetune_mlp_modules=st.booleans(),
    finetune_projector=st.booleans(),
    finetune_cross_attention=st.none() | st.booleans(),
    vision_layers=st.none() | _LAYERS,
    language_layers=st.none() | _LAYERS,
    use_rslora=st.booleans(),
    random_state=st.integers(-(2**63), 2**63 - 1),
    modules_to_save=st.none() | st.lists(_TEXT, max_size=3),
    lora_dtype=st.sampled_from(["float32", "bfloat16", "float16"]),
    rules=st.lists(_RULE, max_size=4),
)


@PROPERTY_SETTINGS
@given(policy=POLICIES, minimal=st.booleans())
def test_round_trip_yaml(policy, minimal):
    text = dump_policy(policy, "yaml", minimal=minimal)
    assert text.startswith("version: 1\n")
    back = parse_policy_text(text, "yaml").policy
    assert back == policy
    assert back.canonical_json() == policy.canonical_json()


@PROPERTY_SETTINGS
@given(policy=POLICIES, minimal=st.booleans())
def test_round_trip_toml(policy, minimal):
    text = dump_policy(policy, "toml", minimal=minimal)
    assert text.startswith("version = 1\n")
    back = parse_policy_text(text, "toml").policy
    assert back == policy
    assert back.canonical_json() == policy.canonical_json()


@PROPERTY_SETTINGS
@given(policy=POLICIES)
def test_dumped_rules_locate_at_their_lines(policy):
    for fmt in ("yaml", "toml"):
        text = dump_policy(policy, fmt)
        source = parse_policy_text(text, fmt, name="p")
        lines = text.split("\n")
        for i, rule in enumerate(policy.rules):
            line = int(source.locate(f"rules[{i}].match").split(":")[1])
            assert "match" in lines[line - 1]
            if rule.r is not None:
                line = int(source.locate(f"rules[{i}].r").split(":")[1])
                assert lines[line - 1].strip().startswith("r")


_ANY_KEY = st.sampled_from(
    ["version", "extends", "rr", *Policy.model_fields, *Rule.model_fields, *RuleMatch.model_fields]
)
_ANY_SCALAR = st.one_of(
    st.none(), st.booleans(), st.integers(-3, 3), st.floats(allow_nan=False, allow_infinity=False),
    st.sampled_from(["vision", "attn.q", "-4:", "a:b", "((", "all-linear", "yes", "full-vlm", "x.yaml"]),
)
_ANY_VALUE = st.recursive(
    _ANY_SCALAR, lambda inner: st.lists(inner, max_size=3) | st.dictionaries(_ANY_KEY, inner, max_size=3),
    max_leaves=8,
)


@PROPERTY_SETTINGS
@given(document=st.dictionaries(_ANY_KEY, _ANY_VALUE, max_size=6))
def test_any_mapping_gives_a_policy_or_located_errors(document, tmp_path_factory):
    """Whatever a file holds, reading it gives a Policy or one located line per problem, never a crash."""
    folder = tmp_path_factory.mktemp("any")
    text = json.dumps(document)  # JSON is YAML
    try:
        parse_policy_text(text, "yaml", name=folder / "p.yaml")
    except PolicyFileError as e:
        assert e.issues and all(i.line is not None and "\n" not in i.message for i in e.issues), str(e)


def test_dump_to_a_path_and_by_format(tmp_path):
    text = dump_policy(EVERY_KEY, tmp_path / "out.toml")
    assert (tmp_path / "out.toml").read_text() == text
    assert load_policy_file(tmp_path / "out.toml") == EVERY_KEY
    assert dump_policy(EVERY_KEY, tmp_path / "out.yml") == dump_policy(EVERY_KEY, "yaml")
    assert load_policy_file(tmp_path / "out.yml") == EVERY_KEY
    assert dump_policy(Policy(), "yaml", minimal=True) == "version: 1\n"
    assert dump_policy(Policy(), "toml", minimal=True) == "version = 1\n"
    with pytest.raises(PolicyError, match="unknown policy file type '.txt'"):
        dump_policy(Policy(), tmp_path / "out.txt")


def test_dump_yaml_is_readable():
    p = Policy(vision_layers="-4:", finetune_mlp_modules=False, rules=[Rule(match=RuleMatch(component="vision"), r=32)])
    assert dump_policy(p, "yaml", minimal=True) == textwrap.dedent(
        """\
        version: 1
        finetune_mlp_modules: false
        vision_layers: '-4:'
        rules:
          - match:
              component: vision
            r: 32
        """
    )
    assert dump_policy(p, "toml", minimal=True) == textwrap.dedent(
        """\
        version = 1
        finetune_mlp_modules = false
        vision_layers = "-4:"

        [[rules]]
        r = 32

        [rules.match]
        component = "vision"
        """
    )


# ---------------------------------------------------------------------------------------------------
# JSON Schema
# ---------------------------------------------------------------------------------------------------
def test_shipped_schema_is_up_to_date(tmp_path):
    shipped = json.loads(SCHEMA_PATH.read_text())
    assert shipped == policy_json_schema(), "run: python -m graphlora.policy"
    out = write_policy_schema(tmp_path / "s.json")
    assert out.read_text() == SCHEMA_PATH.read_text()


def test_schema_describes_the_file_format():
    schema = policy_json_schema()
    props = schema["properties"]
    assert list(props)[:2] == ["version", "extends"]
    assert set(props) == {"version", "extends", *Policy.model_fields}
    assert schema["additionalProperties"] is False
    assert all(p.get("description") for p in props.values()), [k for k, p in props.items() if not p.get("description")]
    for model in ("Rule", "RuleMatch"):
        sub = schema["$defs"][model]["properties"]
        assert all(p.get("description") for p in sub.values()), model
    assert props["extends"]["examples"] == preset_names()


# ---------------------------------------------------------------------------------------------------
# Key paths
# ---------------------------------------------------------------------------------------------------
def test_key_paths():
    assert parse_key_path("rules[2].match.layers") == ("rules", 2, "match", "layers")
    assert parse_key_path("r") == ("r",)
    assert format_key_path(("rules", 2, "match", "layers", 0)) == "rules[2].match.layers[0]"
    for bad in ("rules[", ".r", "rules[x]", "a..b"):
        with pytest.raises(ValueError):
            parse_key_path(bad)


# ---------------------------------------------------------------------------------------------------
# docs/policy.md: the examples load and mean what they say
# ---------------------------------------------------------------------------------------------------
def _doc_blocks() -> dict[str, tuple[str, str]]:
    """Fenced blocks preceded by ``<!-- policy: NAME -->`` in docs/policy.md: NAME -> (format, text)."""
    text = DOCS.read_text()
    found = re.findall(r"<!-- policy: ([\w.-]+) -->\s*```(yaml|toml)\n(.*?)```", text, flags=re.S)
    return {name: (fmt, body) for name, fmt, body in found}


def _select(policy: Policy, towers: dict[str, int]) -> dict[tuple[str, str, int], int]:
    """What the real selection (passes/select_lora_sites_pass.py) decides on a toy model with q/k/v/o and
    gate/up/down linears in every block of each tower: {(component, role, layer): r} of the chosen sites."""
    from graphlora.labels import Component, NodeLabels, Role
    from graphlora.passes.select_lora_sites_pass import decide_site

    out = {}
    for component, n in towers.items():
        for layer in range(n):
            for role in ("attn.q", "attn.k", "attn.v", "attn.o", "mlp.gate", "mlp.up", "mlp.down"):
                module = f"model.{component}.layers.{layer}.{role.replace('.', '_')}"
                labels = NodeLabels(Component(component), Role(role), layer, module)
                decision, _ = decide_site(policy, labels, towers)
                if decision.targeted:
                    out[(component, role, layer)] = decision.r
    return out


def test_docs_examples_load():
    blocks = _doc_blocks()
    assert {"vision-last4-attention", "vision-last4-attention-toml", "every-key", "extends-example"} <= set(blocks)
    for name, (fmt, body) in blocks.items():
        if name == "extends-example":
            continue  # needs its parent file; checked below
        parse_policy_text(body, fmt, name=name)
    assert parse_policy_text(blocks["every-key"][1], "yaml").policy == EVERY_KEY


def test_docs_extends_example(tmp_path):
    fmt, body = _doc_blocks()["extends-example"]
    (tmp_path / "team-base.yaml").write_text(_doc_blocks()["team-base"][1])
    source = parse_policy_text(body, fmt, name=tmp_path / "experiment.yaml")
    p = source.policy
    assert p.r == 8 and p.lora_alpha == 32 and not p.finetune_vision_layers
    assert p.finetune_mlp_modules and p.target_modules == "all-linear"  # from full-vlm
    assert [(r.match.component, r.r) for r in p.rules] == [("projector", 64), ("language", 4)]
    # what the docs say locate() answers
    assert source.locate("rules[0]") == f"{tmp_path}/team-base.yaml:5"
    assert source.locate("rules[1]") == f"{tmp_path}/experiment.yaml:6"
    assert source.locate("r") == f"{tmp_path}/experiment.yaml:3"


def test_docs_show_the_presets_as_shipped():
    text = DOCS.read_text()
    shown = dict(re.findall(r"<!-- preset: ([\w-]+) -->.*?```yaml\n(.*?)```", text, flags=re.S))
    assert sorted(shown) == preset_names()
    for name, body in shown.items():
        shipped = (REPO / "graphlora" / "presets" / f"{name}.yaml").read_text().splitlines()
        keys = [line for line in shipped if line and not line.startswith("#") and line != "version: 1"]
        assert body.splitlines() == keys, name


def test_docs_example_means_what_it_says():
    """"last 4 vision layers and all language layers, attention only, r=32 for vision and 16 for language"."""
    (fmt, yaml_text), (fmt2, toml_text) = _doc_blocks()["vision-last4-attention"], _doc_blocks()[
        "vision-last4-attention-toml"]
    p = parse_policy_text(yaml_text, fmt).policy
    assert p == parse_policy_text(toml_text, fmt2).policy == load_policy_file(DATA / "vision_last4_attention.yaml")
    assert p == load_policy_file(DATA / "vision_last4_attention.toml")
    sites = _select(p, {"vision": 12, "language": 6})
    attention = ("attn.q", "attn.k", "attn.v", "attn.o")
    expected = {("vision", role, layer): 32 for layer in range(8, 12) for role in attention}
    expected |= {("language", role, layer): 16 for layer in range(6) for role in attention}
    assert sites == expected


def test_docs_error_example_is_real():
    text = DOCS.read_text()
    m = re.search(r"<!-- error-example: ([\w.]+) -->\s*```text\n(.*?)```", text, flags=re.S)
    assert m, "docs/policy.md lost its error example"
    path = BAD / m.group(1)
    shown = m.group(2).strip().splitlines()
    actual = [line.replace(str(path.parent) + "/", "") for line in _error_lines(path)]
    assert shown == actual


def test_docs_document_every_key():
    text = DOCS.read_text()
    for key in ["version", "extends", *Policy.model_fields, *Rule.model_fields, *RuleMatch.model_fields]:
        assert f"`{key}`" in text, key
    for name in preset_names():
        assert f"`{name}`" in text and (REPO / "graphlora" / "presets" / f"{name}.yaml").exists()


# ---------------------------------------------------------------------------------------------------
# Site diffs
# ---------------------------------------------------------------------------------------------------
class Site:
    def __init__(self, name, component, role, layer, r, alpha):
        self.name, self.component, self.role, self.layer, self.r, self.alpha = name, component, role, layer, r, alpha


def test_format_site_diff():
    q = "model.language_model.layers.{}.self_attn.q_proj"
    before = [
        Site(q.format(2), "language", "attn.q", 2, 16, 16.0),
        Site(q.format(10), "language", "attn.q", 10, 16, 16.0),
        Site("model.visual.blocks.0.attn.qkv", "vision", "attn.qkv", 0, 16, 16.0),
    ]
    after = [
        {"name": q.format(10), "component": "language", "role": "attn.q", "layer": 10, "r": 32, "alpha": 16.0},
        Site(q.format(2), "language", "attn.q", 2, 16, 16.0),
        Site("model.multi_modal_projector.linear_1", "projector", "other", None, 16, 32.0),
    ]
    assert format_site_diff(before, after) == (
        "--- before: 3 sites\n"
        "+++ after: 3 sites\n"
        "~ model.language_model.layers.10.self_attn.q_proj  language   attn.q    layer 10  r=16->32 alpha=16\n"
        "+ model.multi_modal_projector.linear_1             projector  other     layer -   r=16 alpha=32\n"
        "- model.visual.blocks.0.attn.qkv                   vision     attn.qkv  layer 0   r=16 alpha=16\n"
        "1 added, 1 removed, 1 changed\n"
    )
    assert format_site_diff(before, list(reversed(before))) == ""
    assert format_site_diff([], []) == ""
    with pytest.raises(ValueError, match="appears twice"):
        format_site_diff(before + before[:1], after)
