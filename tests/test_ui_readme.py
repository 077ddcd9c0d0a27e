"""The README's commands work after its own setup: the setup makes a virtualenv without
activating it, so every later command names ``.venv/bin/python`` (plain ``python`` fails with
``ModuleNotFoundError``), and every flag a documented command line shows exists in that command's
``--help``."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()


def _shell_blocks() -> list[list[str]]:
    """The README's shell code blocks (```bash or bare ```), one list of lines per command
    (continuation lines joined)."""
    commands, block, lang = [], None, ""
    for line in README.splitlines():
        if line.startswith("```"):
            if block is None:
                block, lang = [], line[3:].strip()
            else:
                if lang in ("bash", "sh", ""):
                    commands += block
                block = None
            continue
        if block is None:
            continue
        if block and (line.startswith(" ") or block[-1].endswith("\\")) and line.strip():
            block[-1] = block[-1].rstrip("\\") + " " + line.strip()
        elif line.strip():
            block.append(line.strip())
    return commands


def _code_spans() -> list[str]:
    outside = re.sub(r"```.*?```", "", README, flags=re.S)
    return re.findall(r"`([^`\n]+)`", outside)


def test_no_command_uses_a_bare_python_or_hf():
    bare = [c for c in _shell_blocks() + _code_spans() if re.match(r"(python (launch\.py|-m )|hf )", c)]
    assert not bare, "use .venv/bin/python (or .venv/bin/hf) after the README's setup:\n" + "\n".join(bare)
    assert any(c.startswith(".venv/bin/python launch.py generate") for c in _shell_blocks())


def _help(args: list[str]) -> str:
    run = subprocess.run([sys.executable, *args, "--help"], cwd=ROOT, capture_output=True, text=True,
                         timeout=120, env={"HF_HUB_OFFLINE": "1", "PATH": "/usr/bin:/bin"})
    assert run.returncode == 0, (args, run.stderr[-2000:])
    return run.stdout


def test_every_documented_flag_exists():
    by_command: dict[tuple, set] = {}
    for cmd in _shell_blocks():
        m = re.match(r"\.venv/bin/python (launch\.py|-m studio\.[\w.]+)(?: ([a-z][\w-]*)\b)?", cmd)
        if not m:
            continue
        key = tuple(m.group(1).split()) + ((m.group(2),) if m.group(2) else ())
        by_command.setdefault(key, set()).update(re.findall(r"(?<![\w-])(--[a-z][\w-]*)", cmd))
    assert ("launch.py", "generate") in by_command and ("launch.py", "plan") in by_command
    missing = []
    for key, flags in by_command.items():
        text = _help(list(key))
        missing += [f"{' '.join(key)} {flag}" for flag in sorted(flags) if flag not in text]
    assert not missing, "flags the README shows that the command does not have:\n" + "\n".join(missing)
