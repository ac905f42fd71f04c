"""README promises a fresh clone two commands: install + run, and install + tests (what .ci/run
runs). These checks keep the promise true as extras and commands change."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

import pytest

tomllib = pytest.importorskip("tomllib")  # Python 3.11+

REPO = Path(__file__).resolve().parents[1]
README = (REPO / "README.md").read_text(encoding="utf-8")


def _first_bash_block(section: str) -> str:
    body = README.split(f"\n## {section}", 1)[1].split("\n## ", 1)[0]
    return re.search(r"```bash\n(.+?)\n```", body, re.S).group(1).strip()


def _extras(command: str) -> set[str]:
    match = re.search(r'pip install -e "\.\[([\w,]+)\]"', command)
    assert match, f"no editable install with extras in: {command}"
    return set(match.group(1).split(","))


def test_the_two_readme_commands_install_what_they_use():
    declared = set(tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["optional-dependencies"])
    run, tests = _first_bash_block("Install"), _first_bash_block("Tests")
    assert "pip install torch==" in run and run.rstrip().split("&&")[-1].strip().startswith("dsvl2 ")
    assert "pip install torch==" in tests and tests.endswith("python -m pytest -q")
    assert "test" in _extras(tests), "the test command must install the test extra (pytest, hypothesis)"
    assert _extras(run) | _extras(tests) <= declared, "README names an extra pyproject.toml does not declare"


def test_ci_runs_exactly_the_readme_test_command():
    script = (REPO / ".ci" / "run").read_text()
    extractor = script.split("<<'PY'\n", 1)[1].split("\nPY\n", 1)[0]
    out = subprocess.run(["python3", "-c", extractor], cwd=REPO, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == _first_bash_block("Tests")


def test_readme_lists_every_environment_variable():
    from dsvl2_cli import settings

    body = README.split("\n## Environment", 1)[1].split("\n## ", 1)[0]
    missing = [v.name for v in settings.VARIABLES if f"`{v.name}`" not in body]
    assert not missing, f"README's Environment section does not list {missing}"
