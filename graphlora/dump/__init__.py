"""``graphlora dump``: write the graph at every stage of a rewrite, and a map of what gets LoRA.

``dump(model_or_spec, policy, out_dir)`` runs :func:`graphlora.rewrite` with an observer that takes a
snapshot of the graph after export and after every pass, then writes the stage files, the component
map, the node table, the summary and one self-contained HTML page (docs/dump.md). A MODEL SPEC naming
a config directory is built on the meta device and traced with meta tensors, so a 72B model's
targeting can be inspected on a laptop.

The package, one job per module (each imports the ones it needs, never the package itself):

* ``options``: formats, the ``--only`` filter (:class:`NodeFilter`), ``--after`` stages, :class:`DumpError`;
* ``progress``: the progress lines, INFO records of the logger ``graphlora.dump``;
* ``stages``: the recorder that snapshots each stage (:class:`Stage`);
* ``facts``: the node table (:class:`NodeRow`), groups and site labels of the final graph, the summary numbers;
* ``component_map``: :func:`build_component_map`, the graph collapsed by component and layer;
* ``colours``: the one colour table of the DOT file and the HTML page;
* ``render``: stage files, diffs, ``summary.txt``, the DOT text;
* ``html``: ``dump.html`` from the jinja2 templates in ``templates/``;
* ``verification``: the eager-comparison line (through :mod:`graphlora.verify`);
* ``run``: :func:`dump` itself, writing the files; ``cli``: the command.
"""

from graphlora.dump.cli import add_dump_parser
from graphlora.dump.component_map import build_component_map
from graphlora.dump.facts import NodeRow
from graphlora.dump.options import FILTER_KEYS, FORMATS, DumpError, NodeFilter, available_stages
from graphlora.dump.progress import STDERR
from graphlora.dump.render import component_map_dot
from graphlora.dump.run import DumpResult, dump
from graphlora.dump.stages import Stage
from graphlora.dump.verification import META_NOTE

__all__ = [
    "FILTER_KEYS",
    "FORMATS",
    "META_NOTE",
    "STDERR",
    "DumpError",
    "DumpResult",
    "NodeFilter",
    "NodeRow",
    "Stage",
    "add_dump_parser",
    "available_stages",
    "build_component_map",
    "component_map_dot",
    "dump",
]
