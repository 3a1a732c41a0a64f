"""The docs: the README stays a short front page, the MkDocs site builds strictly (a broken page, link or API
reference fails), and every `patchlab …` command written in the README or a page names a real command with
options it really has."""

from __future__ import annotations

import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]


def shell_blocks(text: str) -> list[str]:
    """The bodies of the ```bash code blocks of a Markdown page."""
    return re.findall(r"```(?:bash|sh|console)\n(.*?)```", text, flags=re.S)


def patchlab_commands(text: str) -> list[list[str]]:
    """Every `patchlab …` command line in a page's shell blocks (continuations joined, comments dropped)."""
    out = []
    for block in shell_blocks(text):
        for line in block.replace("\\\n", " ").splitlines():
            line = line.split(" #", 1)[0].strip()
            if line.startswith("patchlab "):
                out.append(shlex.split(line))
    return out


def test_readme_is_a_front_page():
    lines = (ROOT / "README.md").read_text().splitlines()
    assert len(lines) <= 300, f"README is {len(lines)} lines: move reference material into docs/"
    for link in re.findall(r"\]\((docs/[^)#]+)", "\n".join(lines)):
        assert (ROOT / link).exists(), f"README links to {link}, which does not exist"


def test_every_page_is_in_the_nav():
    nav = (ROOT / "mkdocs.yml").read_text()
    for page in (ROOT / "docs").rglob("*.md"):
        rel = page.relative_to(ROOT / "docs").as_posix()
        assert rel in nav, f"docs/{rel} is not in mkdocs.yml's nav"


def test_documented_commands_exist_with_their_options():
    import click
    import typer

    from patchlab.cli import app

    group = typer.main.get_command(app)
    commands = {name: cmd for name, cmd in group.commands.items()}  # type: ignore[attr-defined]
    seen = 0
    for page in PAGES:
        for argv in patchlab_commands(page.read_text()):
            where = f"{page.relative_to(ROOT)}: {' '.join(argv)}"
            if len(argv) < 2 or argv[1].startswith("-"):
                continue
            assert argv[1] in commands, f"{where}: no command '{argv[1]}'"
            cmd: click.Command = commands[argv[1]]
            flags = {o for p in cmd.params for o in (*p.opts, *p.secondary_opts)}
            for tok in argv[2:]:
                if tok.startswith("--"):
                    assert tok.split("=")[0] in flags, f"{where}: '{argv[1]}' has no option {tok}"
            seen += 1
    assert seen >= 30  # the pages really are checked (the README and docs hold dozens of commands)


@pytest.mark.timeout(600)
def test_site_builds_strictly_offline(tmp_path):
    """`mkdocs build --strict`: a warning (a broken link, a page outside the nav, a docstring reference that
    does not resolve) fails the build."""
    pytest.importorskip("mkdocs", reason="the docs extra: pip install -e '.[docs]'")
    run = subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(tmp_path / "site")],
        cwd=ROOT,
        capture_output=True,
        text=True,
        env={"NO_MKDOCS_2_WARNING": "1", "PATH": "/usr/bin:/bin", "HOME": str(tmp_path)},
    )
    assert run.returncode == 0, run.stderr[-3000:]
    html = (tmp_path / "site" / "api" / "methods" / "index.html").read_text()
    assert "evaluate_gap" in html and "compute_edit" in html  # the API reference was generated
    assert "fonts.googleapis" not in (tmp_path / "site" / "index.html").read_text()


def python_blocks(text: str) -> list[str]:
    return re.findall(r"```python\n(.*?)```", text, flags=re.S)


@pytest.mark.timeout(900)
def test_readme_tour_runs_as_written(smol, monkeypatch):
    """The README's Python tour, executed as written (on 4 items per kind instead of 10, and the session's
    model instead of a second load: the same calls, a smaller slice)."""
    import patchlab
    from patchlab.core.prompts import PromptSet

    tour = next(b for b in python_blocks((ROOT / "README.md").read_text()) if "evaluate_edits" in b)
    stratified = PromptSet.stratified
    monkeypatch.setattr(PromptSet, "stratified", lambda self, per_kind: stratified(self, min(per_kind, 4)))
    monkeypatch.setattr(patchlab, "load_model", lambda *a, **k: smol)
    scope: dict = {}
    exec(compile(tour, "README.md (tour)", "exec"), scope)
    report = scope["report"]
    assert report.summary["correction"]["n"] >= 1 and report.summary["correction"]["after"] is not None
