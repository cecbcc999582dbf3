"""Every code block of README.md runs as written.

Python blocks run in order in one namespace (later blocks use the names of earlier ones), in a
temporary working directory. Shell blocks run line by line, except the Quick start, which CI runs
itself (``.ci/run`` takes those two commands from the README).
"""
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

README = Path(__file__).resolve().parents[1] / "README.md"
BLOCK = re.compile(r"^```(\w+)\n(.*?)^```", re.S | re.M)


def blocks(lang):
    return [code for kind, code in BLOCK.findall(README.read_text()) if kind == lang]


def test_the_readme_has_python_and_shell_blocks():
    assert len(blocks("python")) >= 3 and len(blocks("bash")) >= 2


@pytest.mark.slow
def test_python_blocks_run_as_written(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    namespace = {"__name__": "__readme__"}
    for i, code in enumerate(blocks("python")):
        try:
            exec(compile(code, f"README.md python block {i}", "exec"), namespace)
        except Exception as err:  # noqa: BLE001 -- re-raised with the block that failed
            raise AssertionError(f"README python block {i} failed: {type(err).__name__}: {err}\n{code}") from err


def shell_commands():
    out = []
    for code in blocks("bash"):
        for line in code.splitlines():
            line = line.split(" #")[0].strip()
            if not line or line.startswith("#") or line.startswith("pip install"):  # the Quick start: CI runs it
                continue
            out.append(line)
    return out


@pytest.mark.slow
@pytest.mark.parametrize("command", shell_commands())
def test_shell_commands_run_as_written(command, tmp_path):
    argv = shlex.split(command)
    assert argv[0] in ("hessfast", "torchrun"), f"README command {command!r}: only hessfast commands are run here"
    if argv[0] == "hessfast":
        argv = [sys.executable, "-m", "hessfast", *argv[1:]]
    else:
        argv = [sys.executable, "-m", "torch.distributed.run", *argv[1:]]
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(README.parent))
    r = subprocess.run(argv, cwd=tmp_path, capture_output=True, text=True, env=env, timeout=600)
    assert r.returncode == 0, f"{command!r} exited {r.returncode}:\n{r.stderr[-3000:]}"
