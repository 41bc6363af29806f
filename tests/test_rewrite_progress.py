"""Progress of rewrite(): one line per long step, on a terminal (or when forced), never in quiet mode."""

from __future__ import annotations

import io
import os
import pty
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

import graphlora
from graphlora.progress import ENV, progress_stream

CONFIGS = Path(__file__).parent / "data" / "configs"
LINE = re.compile(r"^\[graphlora\] (.+?): (\d+\.\d) s(?: \((.*)\))?$")


def test_rewrite_reports_each_step_on_the_given_stream_in_order(tiny):
    model, inputs = tiny("llava")
    stream = io.StringIO()
    lora_model = graphlora.rewrite(model, None, inputs, progress=stream)
    lines = stream.getvalue().splitlines()
    steps = [LINE.match(line) for line in lines]
    assert all(steps), lines
    names = [m.group(1) for m in steps]
    assert names[0] == "record one eager forward" and names[1] == "label and select"
    exports = [n for n in names if n.startswith("export ")]
    assert exports == ["export CLIPEncoderLayer (1 block)", "export LlamaDecoderLayer (2 blocks)"]
    assert names[-2] == "verify 3 blocks against eager"
    assert names[-1] == "rewrite LlavaForConditionalGeneration"
    assert steps[-1].group(3) == f"{len(lora_model.sites)} sites, trace mode blocks"
    assert steps[1].group(3) == f"{len(lora_model.sites)} sites"


def test_quiet_mode_and_a_redirected_stderr_print_nothing(tiny, capsys, monkeypatch):
    model, inputs = tiny("llava")
    monkeypatch.setenv(ENV, "1")
    graphlora.rewrite(model, None, inputs, progress=False)  # quiet wins over the environment
    assert "[graphlora]" not in capsys.readouterr().err
    monkeypatch.delenv(ENV)
    model, inputs = tiny("llava")
    graphlora.rewrite(model, None, inputs)  # default: stderr (pytest's capture) is not a terminal
    assert "[graphlora]" not in capsys.readouterr().err
    monkeypatch.setenv(ENV, "1")
    model, inputs = tiny("llava")
    graphlora.rewrite(model, None, inputs)  # forced on
    assert "[graphlora] rewrite LlavaForConditionalGeneration:" in capsys.readouterr().err


def test_progress_stream_rules(monkeypatch):
    class Terminal(io.StringIO):
        def isatty(self):
            return True

    monkeypatch.delenv(ENV, raising=False)
    monkeypatch.setattr(sys, "stderr", Terminal())
    assert progress_stream(None) is not None and progress_stream(True) is not None
    assert progress_stream(False) is None
    monkeypatch.setenv(ENV, "0")
    assert progress_stream(None) is None and progress_stream(True) is not None
    monkeypatch.setattr(sys, "stderr", io.StringIO())
    monkeypatch.delenv(ENV)
    assert progress_stream(None) is None


_SCRIPT = textwrap.dedent("""
    import sys, graphlora
    from graphlora.model_spec import load_model_spec
    model, _ = load_model_spec(sys.argv[1], meta=True)  # as `graphlora dump` / `explain` build it
    graphlora.rewrite(model, dict(finetune_vision_layers=True, finetune_language_layers=True),
                      progress=None if sys.argv[2] == "default" else False)
    print("done", flush=True)
""")


def _run_on_a_terminal(mode: str) -> tuple[str, str]:
    """Run the 11B rewrite with stderr on a pseudo-terminal: (stdout, what the terminal showed)."""
    controller, terminal = pty.openpty()
    env = {k: v for k, v in os.environ.items() if k != ENV}
    proc = subprocess.Popen([sys.executable, "-c", _SCRIPT, str(CONFIGS / "Llama-3.2-11B-Vision-Instruct"), mode],
                            stdout=subprocess.PIPE, stderr=terminal, env=env, text=True)
    os.close(terminal)
    shown = []
    while True:
        try:
            chunk = os.read(controller, 65536)
        except OSError:  # the child closed its end
            break
        if not chunk:
            break
        shown.append(chunk.decode(errors="replace"))
    os.close(controller)
    stdout, _ = proc.communicate(timeout=600)
    assert proc.returncode == 0, "".join(shown)[-3000:]
    return stdout, "".join(shown).replace("\r\n", "\n")


@pytest.mark.slow
def test_rewrite_of_the_11b_vision_config_on_meta_shows_progress_on_a_terminal_and_not_when_quiet():
    stdout, shown = _run_on_a_terminal("default")
    assert "done" in stdout
    lines = [line for line in shown.splitlines() if line.startswith("[graphlora] ")]
    names = [LINE.match(line).group(1) for line in lines if LINE.match(line)]
    assert names[0] == "record one eager forward on meta", lines
    assert any(n.startswith("export MllamaSelfAttentionDecoderLayer (") for n in names), names
    assert any(n.startswith("export MllamaCrossAttentionDecoderLayer (") for n in names), names
    assert names[-1] == "rewrite MllamaForConditionalGeneration", names
    stdout, shown = _run_on_a_terminal("quiet")
    assert "done" in stdout and "[graphlora]" not in shown
