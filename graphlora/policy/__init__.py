"""Policies: which linears of a VLM get LoRA, as Python objects and as YAML or TOML files.

The package re-exports the public names of its modules, one job each:

* :mod:`.schema`: the pydantic models (:class:`Policy`, :class:`Rule`, :class:`RuleMatch`), layer
  selections, the file-format version;
* :mod:`.source`: reading files and strings (``extends``, merging, :class:`PolicySource` with the line of
  every key), :func:`as_policy`;
* :mod:`.yaml_reader`: the strict YAML reader; :mod:`.toml_positions`: the TOML reader and the scanner
  that finds each key's line;
* :mod:`.messages`: located one-line issues (:class:`PolicyFileError`), did-you-mean, pydantic's errors
  retold;
* :mod:`.key_paths`: ``rules[1].match`` <-> ``("rules", 1, "match")``;
* :mod:`.presets`, :mod:`.writer` (:func:`dump_policy`), :mod:`.json_schema`, :mod:`.site_diff`.

``python -m graphlora.policy`` regenerates the shipped JSON Schema.
"""

from graphlora.policy.json_schema import SCHEMA_PATH, policy_json_schema, write_policy_schema
from graphlora.policy.key_paths import format_key_path, parse_key_path
from graphlora.policy.messages import PolicyFileError, PolicyIssue
from graphlora.policy.presets import PRESETS_DIR, preset_names, preset_path
from graphlora.policy.schema import (
    SUPPORTED_VERSION,
    LayerSelection,
    Policy,
    Rule,
    RuleMatch,
    parse_layer_selection,
    resolve_layers,
)
from graphlora.policy.site_diff import format_site_diff
from graphlora.policy.source import (
    PolicySource,
    as_policy,
    load_policy,
    load_policy_file,
    load_policy_source,
    load_preset,
    parse_policy_text,
)
from graphlora.policy.toml_positions import TomlLineScanner
from graphlora.policy.writer import dump_policy
from graphlora.policy.yaml_reader import StrictYamlLoader

__all__ = [
    "PRESETS_DIR",
    "SCHEMA_PATH",
    "SUPPORTED_VERSION",
    "LayerSelection",
    "Policy",
    "PolicyFileError",
    "PolicyIssue",
    "PolicySource",
    "Rule",
    "RuleMatch",
    "StrictYamlLoader",
    "TomlLineScanner",
    "as_policy",
    "dump_policy",
    "format_key_path",
    "format_site_diff",
    "load_policy",
    "load_policy_file",
    "load_policy_source",
    "load_preset",
    "parse_key_path",
    "parse_layer_selection",
    "parse_policy_text",
    "policy_json_schema",
    "preset_names",
    "preset_path",
    "resolve_layers",
    "write_policy_schema",
]
