"""The ``graphlora`` command line (also ``python -m graphlora``)."""

from __future__ import annotations

import argparse
import sys

from graphlora.errors import GraphLoraError

MODEL_SPEC_HELP = ("MODEL SPEC: a built-in tiny model name (e.g. llava), module:function returning "
                   "(model, example_inputs), or a directory holding a transformers config.json")


def _cmd_demo(args: argparse.Namespace) -> int:
    from graphlora.testing.demo import run_demo

    run_demo(args.model, args.strategy, args.steps)
    return 0


def _cmd_explain(args: argparse.Namespace) -> int:
    from graphlora.explainer import explain
    from graphlora.model_spec import load_model_spec
    from graphlora.report import format_explain

    model, example_inputs = load_model_spec(args.model)
    rows = explain(model, args.policy, example_inputs)
    print(format_explain(rows))
    return 0


def _sites_for(model_spec: str, policy_path: str):
    from graphlora.model_spec import load_model_spec
    from graphlora.rewriter import rewrite

    model, example_inputs = load_model_spec(model_spec)
    return rewrite(model, policy_path, example_inputs).sites


def _cmd_policy_check(args: argparse.Namespace) -> int:
    from graphlora.policy import load_policy_source

    source = load_policy_source(args.file)
    if args.model:
        sites = _sites_for(args.model, args.file)
        print(f"{args.file}: ok ({len(sites)} LoRA sites on {args.model}; every rule matches)")
    else:
        print(f"{args.file}: ok (digest {source.policy.digest()[:12]})")
    return 0


def _cmd_policy_diff(args: argparse.Namespace) -> int:
    from graphlora.policy import format_site_diff

    before = _sites_for(args.model, args.a)
    after = _sites_for(args.model, args.b)
    text = format_site_diff(before, after, labels=(args.a, args.b))
    print(text.rstrip() if text else f"{args.a} and {args.b} select the same sites with the same settings")
    return 0


def _cmd_policy_schema(args: argparse.Namespace) -> int:
    import json

    from graphlora.policy import policy_json_schema

    print(json.dumps(policy_json_schema(), indent=2))
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="graphlora", description="Compiler-style LoRA for vision-language models.")
    sub = parser.add_subparsers(dest="command", required=True)

    demo = sub.add_parser("demo", help="rewrite a tiny VLM, train a few steps, generate")
    demo.add_argument("--model", default="llava", help=MODEL_SPEC_HELP)
    demo.add_argument("--strategy", default="language-only", help="a preset: language-only, vision-only, full-vlm ...")
    demo.add_argument("--steps", type=int, default=12)
    demo.set_defaults(func=_cmd_demo)

    explain = sub.add_parser("explain", help="one row per linear: labels, LoRA or not, and why")
    explain.add_argument("model", help=MODEL_SPEC_HELP)
    explain.add_argument("--policy", default=None, help="policy file (YAML or TOML); default: the default policy")
    explain.set_defaults(func=_cmd_explain)

    policy = sub.add_parser("policy", help="check, compare and describe policy files")
    psub = policy.add_subparsers(dest="policy_command", required=True)
    check = psub.add_parser("check", help="syntax and schema; with --model also that every rule matches")
    check.add_argument("file")
    check.add_argument("--model", default=None, help=MODEL_SPEC_HELP)
    check.set_defaults(func=_cmd_policy_check)
    diff = psub.add_parser("diff", help="LoRA sites added, removed and changed between two policies")
    diff.add_argument("a")
    diff.add_argument("b")
    diff.add_argument("--model", required=True, help=MODEL_SPEC_HELP)
    diff.set_defaults(func=_cmd_policy_diff)
    schema = psub.add_parser("schema", help="print the JSON Schema of policy files")
    schema.set_defaults(func=_cmd_policy_schema)

    from graphlora.dump import add_dump_parser

    add_dump_parser(sub, MODEL_SPEC_HELP)
    return parser


def _quiet_third_party_logs() -> None:
    """transformers imports torchao when it is installed, which logs about optional CUDA libraries
    (command line only; graphlora imports transformers lazily, so this runs first)."""
    import logging

    for name in ("torchao", "torch.utils._pytree"):
        logging.getLogger(name).setLevel(logging.ERROR)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    _quiet_third_party_logs()
    try:
        return args.func(args)
    except GraphLoraError as e:
        print(f"graphlora: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
