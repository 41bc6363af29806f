"""``dump()``: rewrite a model with a recorder attached and write every file of the dump.

Reads a model or MODEL SPEC, a policy and the request (:mod:`graphlora.dump.options`); runs
:func:`graphlora.rewrite` with a :class:`~graphlora.dump.stages.Recorder` as its observer; then
writes into ``out_dir`` (docs/dump.md):

* ``text``: ``NN_<stage>.txt`` per stage (``00_export``, then one per pass in pass order) in
  ``print_readable`` style with each node's labels, decision, LoRA step and fusion status as
  ``# graphlora:`` comment lines, and ``NN_<stage>.diff``, the unified diff from the previous stage;
* ``dot``: ``component_map.dot`` (and ``component_map.svg`` when Graphviz's ``dot`` is installed):
  the graph collapsed by component and layer;
* ``json``: ``component_map.json`` (networkx node-link), ``nodes.json`` (the node table) and
  ``summary.json``;
* ``html``: ``dump.html``, one self-contained page (no network);
* always ``summary.txt``: per component the linears, LoRA sites, fused sites and trainable
  parameters, and the skipped sites with their reasons.

Guarantees: the files of a previous dump into the same directory (those its manifest
``.graphlora-dump-files`` lists) are removed first, and the manifest lists what this one wrote; when
the rewrite fails, the stages traced so far and ``error.txt`` are written before the error is
re-raised. A config directory is built on the meta device (no weight is allocated; the comparison
with eager is then skipped). Progress is logged, one line per stage (:mod:`graphlora.dump.progress`).
"""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path
import time
from typing import Any, Iterable, Mapping, Sequence, TextIO

import torch

from graphlora.dump.component_map import build_component_map
from graphlora.dump.facts import GraphFacts, NodeRow, summary_numbers, traced_graphs
from graphlora.dump.options import FORMATS, DumpError, NodeFilter, available_stages, parse_formats, resolve_policy
from graphlora.dump.progress import STDERR, _Stderr, first_line, progress_to, say
from graphlora.dump.render import component_map_dot, diff_text, format_summary, render_stage, run_graphviz
from graphlora.dump.stages import Recorder, Stage, filter_includes
from graphlora.dump.verification import META_NOTE, verification_line

#: The file that lists what the previous dump into a directory wrote (removed before a new dump).
_MANIFEST = ".graphlora-dump-files"


@dataclasses.dataclass
class DumpResult:
    """What :func:`dump` wrote and found.

    ``files`` are the paths written (in ``out_dir``); ``stages`` the snapshots in order; ``summary``
    the text of ``summary.txt``; ``component_map`` the networkx DiGraph; ``lora_model`` the rewritten
    model; ``meta`` whether it ran on the meta device; ``verification`` the eager-comparison line;
    ``rows`` the node table of the final graph (not filtered by ``only``); ``seconds`` the whole dump.
    """

    out_dir: Path
    files: list[Path]
    stages: list[Stage]
    summary: str
    component_map: Any
    lora_model: Any
    meta: bool
    verification: str
    rows: list[NodeRow]
    seconds: float

    def file(self, name: str) -> Path:
        path = self.out_dir / name
        if path not in self.files:
            raise KeyError(f"{name} was not written by this dump")
        return path


def _is_meta(model: torch.nn.Module) -> bool:
    for p in model.parameters():
        return p.device.type == "meta"
    for b in model.buffers():
        return b.device.type == "meta"
    return False


def _clean_previous(out_dir: Path) -> None:
    manifest = out_dir / _MANIFEST
    if not manifest.is_file():
        return
    for name in manifest.read_text().splitlines():
        name = name.strip()
        if name and "/" not in name and "\\" not in name and not name.startswith("."):
            try:
                (out_dir / name).unlink()
            except FileNotFoundError:
                pass


class _Writer:
    def __init__(self, out_dir: Path):
        self.out_dir = out_dir
        self.files: list[Path] = []

    def write(self, name: str, text: str) -> Path:
        path = self.out_dir / name
        path.write_text(text, encoding="utf-8")
        if path not in self.files:
            self.files.append(path)
        return path

    def finish(self) -> None:
        (self.out_dir / _MANIFEST).write_text("\n".join(p.name for p in self.files) + "\n")


def _write_stage_files(writer: _Writer, stages: list[Stage], title: str, flt: NodeFilter | None,
                       after: str | None) -> None:
    includes = filter_includes(stages, flt)
    wanted = {s.index for s in stages if after is None or s.name == after}
    texts: dict[int, str] = {}

    def text_of(stage: Stage) -> str:
        if stage.index not in texts:
            include = None if includes is None else includes[stage.index]
            texts[stage.index] = render_stage(stage, title, include, flt, len(stages))
        return texts[stage.index]

    for stage in stages:
        if stage.index not in wanted:
            continue
        writer.write(f"{stage.stem}.txt", text_of(stage))
        prev = stages[stage.index - 1] if stage.index > 0 else None
        if prev is not None and prev.trace == stage.trace:
            diff = diff_text(text_of(prev), text_of(stage), f"{prev.stem}.txt", f"{stage.stem}.txt")
            writer.write(f"{stage.stem}.diff", diff)


def dump(
    model_or_spec: torch.nn.Module | str,
    policy=None,
    out_dir: str | Path = "graphlora-dump",
    formats: str | Iterable[str] | None = FORMATS,
    after: str | None = None,
    only: NodeFilter | str | Mapping[str, Any] | Sequence[str] | None = None,
    example_inputs: dict[str, Any] | None = None,
    *,
    verify: bool = True,
    trace_mode: str = "auto",
    fuse: bool | str = "auto",
    progress: "TextIO | _Stderr | None" = STDERR,
) -> DumpResult:
    """Rewrite ``model_or_spec`` under ``policy`` and write the graph dump into ``out_dir``.

    ``model_or_spec``: an ``nn.Module`` or a MODEL SPEC (a tiny model name, ``module:function``, or a
    config directory, which is built on the meta device). ``formats``: any of ``text``, ``dot``,
    ``json``, ``html`` (``summary.txt`` is always written). ``after``: write the per-stage files of
    that stage only (``export`` or a pass name). ``only``: a :class:`NodeFilter` or its text form
    (``"component=vision,layer=0-3"``) for the stage files and node tables. ``example_inputs``: one
    batch (default: the spec's, else synthesised; meta tensors for a meta model). ``verify``: compare
    the rewritten program with the original model on that batch (not possible on the meta device).
    ``trace_mode``, ``fuse``: as :func:`graphlora.rewrite` (``"regional"`` dumps each region's trace,
    ``"blocks"`` the analysis recording and each block class's trace). ``progress``: where the
    progress lines (``[graphlora] export: 1.7 s (55 nodes)``) are shown, ``sys.stderr`` by default,
    None for nowhere; they are INFO records of the logger ``graphlora.dump`` either way.
    As with :func:`graphlora.rewrite`, a model passed in has its parameters frozen.
    """
    with progress_to(progress):
        return _dump(model_or_spec, policy, out_dir, formats, after, only, example_inputs, verify=verify,
                     trace_mode=trace_mode, fuse=fuse)


def _dump(model_or_spec, policy, out_dir, formats, after, only, example_inputs, *, verify, trace_mode,
          fuse) -> DumpResult:
    from graphlora.rewriter import rewrite

    started = time.perf_counter()
    fmts = parse_formats(formats)
    flt = NodeFilter.parse(only)
    if after is not None:
        known = available_stages()
        if after not in known:
            raise DumpError(f"--after {after!r}: no such pass; available: {', '.join(known)}")
    out = Path(out_dir)
    model, title, inputs = _load(model_or_spec, example_inputs)
    meta = _is_meta(model)

    policy, policy_label = resolve_policy(policy)
    out.mkdir(parents=True, exist_ok=True)
    _clean_previous(out)
    writer = _Writer(out)
    recorder = Recorder()
    recorder.restart_clock()
    try:
        lora_model = rewrite(model, policy, inputs, observer=recorder, verify=bool(verify) and not meta,
                             trace_mode=trace_mode, fuse=fuse)
    except BaseException as e:
        _write_failure(writer, recorder, title, fmts, e)
        raise

    stage_names = [s.name for s in recorder.stages]
    if after is not None and after not in stage_names:
        raise DumpError(f"--after {after!r}: that pass did not run on this model; stages: {', '.join(stage_names)}")

    verification, verify_details = verification_line(model, lora_model, inputs, meta=meta, verify=verify)

    t0 = time.perf_counter()
    traced = traced_graphs(recorder, lora_model)
    finals = {t: max((s for s in recorder.stages if s.trace == t), key=lambda s: s.index) for t in recorder.graphs}
    final = finals[traced[0].trace]
    facts = GraphFacts(traced, lora_model)
    includes = filter_includes(recorder.stages, flt)
    include = None
    if includes is not None:
        include = {t.key + name for t in traced for name in includes[finals[t.trace].index]}
    numbers = summary_numbers(lora_model, facts)
    device = "meta" if meta else str(next(iter(model.parameters()), torch.empty(0)).device)
    head = [
        f"graphlora dump of {title}",
        f"policy: {policy_label} (digest {lora_model.policy.digest()[:12]})",
        f"device: {device}; {verification}",
        "stages: " + ", ".join(f"{s.index:02d} {s.name}" for s in recorder.stages),
    ]
    if flt is not None:
        head.append(f"filter (stage files and node tables): {flt.describe()}")
    summary = format_summary(head, numbers)
    writer.write("summary.txt", summary)

    graph = build_component_map(facts, lora_model)
    shown_rows = [r for r in facts.rows if include is None or r.node in include]
    map_title = f"{title}: {len(lora_model.sites)} LoRA sites"

    if "text" in fmts:
        _write_stage_files(writer, recorder.stages, title, flt, after)
    dot_text = component_map_dot(graph, map_title)
    svg = None
    if "dot" in fmts or "html" in fmts:
        svg = run_graphviz(dot_text)
    if "dot" in fmts:
        writer.write("component_map.dot", dot_text)
        if svg is not None:
            writer.write("component_map.svg", svg)
    stage_info = [dict(index=s.index, name=s.name, seconds=round(s.seconds, 3), nodes=s.num_nodes)
                  for s in recorder.stages]
    if "json" in fmts:
        import networkx as nx

        writer.write("component_map.json", json.dumps(nx.node_link_data(graph, edges="edges"), indent=1) + "\n")
        writer.write("nodes.json", json.dumps({
            "model": title, "filter": flt.describe() if flt else None, "stage": final.name,
            "nodes": [r.as_json() for r in shown_rows],
        }, indent=1) + "\n")
        writer.write("summary.json", json.dumps({
            "model": title, "policy": policy_label, "policy_digest": lora_model.policy.digest(),
            "device": device, "meta": meta, "verification": verification, "verification_details": verify_details,
            "stages": stage_info, **numbers,
        }, indent=1, default=str) + "\n")
    if "html" in fmts:
        from graphlora.dump.html import render_html

        writer.write("dump.html", render_html(
            title=title, summary=summary, svg=svg, graph=graph,
            rows=[r.as_json() for r in shown_rows if r.kind != "lora"],
            stages=stage_info, filter_text=flt.describe() if flt else "", meta_note=META_NOTE if meta else "",
        ))
    writer.finish()
    say(f"write {', '.join(('summary',) + fmts)}: {time.perf_counter() - t0:.1f} s")
    seconds = time.perf_counter() - started
    say(f"dump written to {out} ({len(writer.files)} files, {seconds:.1f} s in all)")
    return DumpResult(out, list(writer.files), recorder.stages, summary, graph, lora_model, meta, verification,
                      facts.rows, seconds)


def _load(model_or_spec, example_inputs) -> tuple[torch.nn.Module, str, Any]:
    """(model, title, example inputs): a MODEL SPEC is built (on the meta device for a config directory)."""
    if isinstance(model_or_spec, torch.nn.Module):
        model, title = model_or_spec, type(model_or_spec).__name__
        spec_inputs = None
    elif isinstance(model_or_spec, (str, os.PathLike)):
        from graphlora.model_spec import load_model_spec

        spec = str(model_or_spec)
        t0 = time.perf_counter()
        model, spec_inputs = load_model_spec(spec, meta=True)
        title = f"{spec} ({type(model).__name__})"
        say(f"load model: {time.perf_counter() - t0:.1f} s ({type(model).__name__})")
    else:
        raise TypeError(f"dump() takes an nn.Module or a MODEL SPEC string, not {type(model_or_spec).__name__}")
    inputs = example_inputs if example_inputs is not None else spec_inputs
    if inputs is None:  # a meta model takes CPU inputs (the prologue may need their values)
        from graphlora.families import synthesize_inputs

        inputs = synthesize_inputs(model)
    return model, title, inputs


def _write_failure(writer: _Writer, recorder: Recorder, title: str, fmts: tuple[str, ...], e: BaseException) -> None:
    """Whatever was traced is worth reading: write those stages and the error (the caller re-raises)."""
    import traceback

    if recorder.stages and "text" in fmts:
        _write_stage_files(writer, recorder.stages, title, None, None)
    where = (f"after stage {recorder.stages[-1].stem}" if recorder.stages
             else "before the first stage (model preparation or export)")
    writer.write("error.txt", f"graphlora dump of {title} failed {where}:\n{type(e).__name__}: {e}\n\n"
                              + "".join(traceback.format_exception(e)))
    writer.finish()
    say(f"failed {where}: {type(e).__name__}: {first_line(e)} (see {writer.out_dir / 'error.txt'})")
