"""The README is a guide that stays true: at most about 300 lines, every link resolves to a file or a heading of the
repository, and every command it shows parses (a subcommand's arguments through carso's own parser, a Snakemake
command as a dry run in a throw-away project, a DVC command as a dry run, a script through --help)."""
from __future__ import annotations

import re
import shlex
import shutil
from pathlib import Path

import pytest

from conftest import REPO, load_tiny, make_dvc_repo, make_project, run_tool
from test_plugins import install_example

README = REPO / "README.md"
MAX_LINES = 300


def commands() -> list[str]:
    """Every command line of the README's bash blocks, without its trailing comment."""
    blocks = re.findall(r"```bash\n(.*?)```", README.read_text(), flags=re.S)
    lines = [re.split(r"\s+#\s", line)[0].strip() for block in blocks for line in block.splitlines()]
    return [line for line in lines if line and not line.startswith("#")]


def _anchor(heading: str) -> str:
    """GitHub's anchor of a heading."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def test_the_readme_is_short_and_every_link_resolves() -> None:
    text = README.read_text()
    assert len(text.splitlines()) <= MAX_LINES
    links = re.findall(r"\]\(([^)\s]+)\)", text)
    assert links
    for link in links:
        if link.startswith("http"):
            continue
        path, _, anchor = link.partition("#")
        target = (REPO / path) if path else README
        assert target.exists(), link
        if anchor:
            headings = re.findall(r"^#+ (.*)$", target.read_text(), flags=re.M)
            assert anchor in {_anchor(h) for h in headings}, link


def test_every_carso_and_run_sh_command_parses() -> None:
    from carso.cli import build_parser

    seen = 0
    for line in commands():
        words = shlex.split(line)
        if words[:3] == ["python", "-m", "carso"]:
            build_parser().parse_args(words[3:])  # exits (SystemExit) on a command that does not parse
            seen += 1
        elif words[:2] == ["bash", "run.sh"]:
            assert words[2] in ("setup", "pipeline", "tests"), line
            seen += 1
    assert seen >= 5


@pytest.mark.slow
def test_every_snakemake_dvc_and_plugin_command_runs_as_a_dry_run(tmp_path: Path) -> None:
    """Each Snakemake command of the README as `snakemake -n` in a project with its configs, studies and example; each
    DVC command through --help, and `dvc dag` in the same project made a DVC repository; the plugin's Snakemake
    command with the plugin installed."""
    project = make_dvc_repo(make_project(tmp_path / "project", load_tiny()))
    for folder in ("configs", "studies", "examples"):
        shutil.copytree(REPO / folder, project / folder, ignore=shutil.ignore_patterns("build", "*.egg-info"))
    site = install_example(tmp_path / "site")
    plugin_path = {"PYTHONPATH": str(site)}
    ran = []
    for line in commands():
        words = shlex.split(line)
        tool = Path(words[0]).name
        if tool == "snakemake":
            result = run_tool(["snakemake", "-n", *words[1:]], cwd=project, timeout=300, env=plugin_path)
        elif tool == "dvc":  # its arguments parse, and the pipeline it would run is a valid DAG
            result = run_tool(["dvc", *words[1:], "--help"], cwd=project, timeout=300)
            if result.returncode == 0:
                result = run_tool(["dvc", "dag"], cwd=project, timeout=300)
        elif tool == "pip":
            assert (REPO / words[-1] / "pyproject.toml").exists(), line
            continue
        elif tool == "python" and words[1:3] == ["-m", "pytest"]:
            assert (REPO / words[3]).is_dir(), line
            continue
        else:
            continue
        assert result.returncode == 0, f"{line}\n{result.stdout[-2000:]}\n{result.stderr[-2000:]}"
        ran.append(tool)
    assert ran.count("snakemake") >= 4 and ran.count("dvc") == 2
