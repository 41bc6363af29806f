"""``python -m graphlora.policy``: regenerate the shipped JSON Schema (graphlora/policy.schema.json)."""

from graphlora.policy.json_schema import write_policy_schema

if __name__ == "__main__":
    print(write_policy_schema())
