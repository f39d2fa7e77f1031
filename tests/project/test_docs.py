"""Every ``python`` / ``bash`` block of README.md and docs/*.md runs here, or says why it does not (issue 27, item 7).

How a block is treated (conventions for whoever writes the docs):

- By default it runs as written, from a scratch folder in which the repository's ``examples/``, ``workflows/`` and
  benchmark scripts are visible (so ``examples/structures/Si_diamond.cif`` works; outputs stay in the scratch folder).
  The python blocks of one file share one namespace (a module), in order; a bash block runs line by line
  (continuations joined): a ``geodite-sim ...`` line in this process (``geodite_sim.cli.main``, globs expanded as
  bash would), a ``python script.py ...`` line in this process too (``runpy``), any other line with ``bash -c`` and
  the venv first on ``PATH``; every line must exit with status 0.
- ``# not run by the docs test: <reason>`` as the block's first line, or ``<!-- docs test: not run: <reason> -->``
  on the line above it: not run (GPU, cluster, hours of CPU, a fragment); the reason is required.
- ``<!-- docs test: fast: "OLD" -> "NEW"; "OLD2" -> "NEW2" -->`` on the line above: run with these replacements,
  a fast variant of a long example (fewer steps, a smaller input); each OLD must occur in the block.

Threads: one (the docs' examples are tiny; the suite runs on a shared machine).
"""

from __future__ import annotations

import glob
import os
import re
import shlex
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
DOCS = ["README.md", *sorted(str(p.relative_to(ROOT)) for p in (ROOT / "docs").glob("*.md"))]
LANGUAGES = {"python", "bash", "sh", "shell"}
NOT_RUN = re.compile(r"^\s*#\s*not run by the docs test:\s*(.*)$")
MARKER = re.compile(r"^\s*<!--\s*docs test:\s*(not run|fast):\s*(.*?)\s*-->\s*$")
REPLACEMENT = re.compile(r'"((?:[^"\\]|\\.)*)"\s*->\s*"((?:[^"\\]|\\.)*)"')


@dataclass
class Block:
    """One fenced code block: where it is, its language and text, and what the docs test does with it."""

    doc: str
    line: int
    language: str
    code: str
    skip: str | None = None  # the reason it is not run
    fast: list[tuple[str, str]] = field(default_factory=list)

    @property
    def where(self) -> str:
        return f"{self.doc}:{self.line}"

    def runnable(self) -> str:
        """The code to run: the block with its fast replacements applied."""
        code = self.code
        for old, new in self.fast:
            assert old in code, f"{self.where}: the fast variant replaces {old!r}, which the block does not contain"
            code = code.replace(old, new)
        return code


def blocks(doc: str) -> list[Block]:
    """The python/bash blocks of ``doc`` with their markers."""
    lines = (ROOT / doc).read_text().splitlines()
    out, i = [], 0
    while i < len(lines):
        m = re.match(r"^\s*```\s*(\w*)", lines[i])
        if not m:
            i += 1
            continue
        j = i + 1
        while j < len(lines) and not lines[j].strip().startswith("```"):
            j += 1
        language = m.group(1).lower()
        if language in LANGUAGES:
            body = lines[i + 1:j]
            block = Block(doc, i + 1, "python" if language == "python" else "bash", "\n".join(body) + "\n")
            first = NOT_RUN.match(body[0]) if body else None
            if first:
                block.skip = first.group(1).strip()
            above = MARKER.match(lines[i - 1]) if i > 0 else None
            if above and above.group(1) == "not run":
                block.skip = above.group(2).strip()
            elif above:
                block.fast = [(a.encode().decode("unicode_escape"), b.encode().decode("unicode_escape"))
                              for a, b in REPLACEMENT.findall(above.group(2))]
                assert block.fast, f"{block.where}: a fast marker without replacements"
            out.append(block)
        i = j + 1
    return out


def test_every_block_is_run_or_says_why():
    """Markers are well formed: a not-run block gives a reason; the docs hold blocks to test at all."""
    all_blocks = [b for doc in DOCS for b in blocks(doc)]
    assert len(all_blocks) > 30
    for b in all_blocks:
        if b.skip is not None:
            assert len(b.skip) >= 10, f"{b.where}: 'not run' needs a reason, got {b.skip!r}"


def bash_lines(code: str) -> list[str]:
    """Logical lines of a bash block (continuations joined, comments and blank lines dropped)."""
    out, current = [], ""
    for raw in code.splitlines():
        current += raw.rstrip()
        if current.endswith("\\"):
            current = current[:-1] + " "
            continue
        if current.strip() and not current.strip().startswith("#"):
            out.append(current.strip())
        current = ""
    return out


def _expand(args: list[str]) -> list[str]:
    out = []
    for a in args:
        hits = sorted(glob.glob(a)) if glob.has_magic(a) else []
        out.extend(hits or [a])
    return out


def _run_script(argv: list[str]) -> int:
    """``python script.py args`` in this process (the interpreter's start-up and imports are paid once)."""
    import runpy

    saved = sys.argv[:], sys.path[:]
    sys.argv = argv
    try:
        runpy.run_path(argv[0], run_name="__main__")
        return 0
    except SystemExit as exc:
        return exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
    finally:
        sys.argv, sys.path[:] = saved[0], saved[1]


def run_bash(block: Block, capsys) -> None:
    from geodite_sim.cli import main

    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}",
           "OMP_NUM_THREADS": "1"}
    for line in bash_lines(block.runnable()):
        words = shlex.split(line, comments=True)
        if words[0] == "geodite-sim" or (words[0] == "python" and len(words) > 1 and words[1].endswith(".py")):
            argv = _expand(words[1:])
            try:
                rc = main(argv) if words[0] == "geodite-sim" else _run_script(argv)
            except SystemExit as exc:
                rc = exc.code if isinstance(exc.code, int) else 1
            captured = capsys.readouterr()
            assert rc == 0, f"{block.where}: `{line}` exited {rc}\n{captured.out[-3000:]}\n{captured.err[-3000:]}"
        else:
            done = subprocess.run(["bash", "-c", line], env=env, capture_output=True, text=True)
            assert done.returncode == 0, f"{block.where}: `{line}` exited {done.returncode}\n{done.stdout[-2000:]}" \
                                         f"\n{done.stderr[-2000:]}"


@pytest.fixture()
def scratch(tmp_path, monkeypatch):
    """A scratch folder that sees the repository's examples, workflows and benchmark scripts (outputs, including a
    benchmark's ``benchmarks/results/``, stay in the scratch folder)."""
    for name in ("examples", "workflows"):
        (tmp_path / name).symlink_to(ROOT / name)
    (tmp_path / "benchmarks").mkdir()
    for script in (ROOT / "benchmarks").glob("*.py"):
        (tmp_path / "benchmarks" / script.name).symlink_to(script)
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    return tmp_path


@pytest.mark.parametrize("doc", DOCS)
def test_doc_blocks_run(doc, scratch, capsys, one_thread):
    """The runnable blocks of one file, in order (python blocks share a namespace)."""
    import matplotlib

    matplotlib.use("Agg")
    import types

    todo = [b for b in blocks(doc) if b.skip is None]
    if not todo:
        pytest.skip(f"{doc}: every block says why it is not run")
    module = types.ModuleType("docs_example")  # a real module: dataclasses and pickling look their classes up
    sys.modules[module.__name__] = module
    try:
        for b in todo:
            if b.language == "python":
                exec(compile(b.runnable(), b.where, "exec"), module.__dict__)  # noqa: S102 - the docs' own code
            else:
                run_bash(b, capsys)
    finally:
        sys.modules.pop(module.__name__, None)


def test_demo_runs(scratch, capsys):
    """What ``make demo`` runs (README's first command), with a few steps per structure."""
    from geodite_sim.cli import main

    assert main(["demo", "--max-steps", "3", "--out", "out/demo"]) in (0, 1)
    out = capsys.readouterr().out
    assert "40 structures:" in out and "0 failed" in out


def test_campaign_quick_look_analyses_frames(scratch, capsys):
    """docs/sse-campaign.md's quick look (``--steps N`` shorter than the spec's discarded time) analyses frames
    (it analysed none: the 300 fs discard covered the whole run)."""
    import json

    from geodite_sim.cli import main

    assert main(["campaign", "workflows/sse/short.toml", "--steps", "30", "--output", "out/quick", "--no-report"]) == 0
    err = capsys.readouterr().err
    assert "discards the first 4.5 fs (10 %) instead" in err
    analysis = json.loads((scratch / "out" / "quick" / "analysis.json").read_text())  # run id -> key, result
    frames = [r["result"].get("n_frames", 0) for r in analysis.values()]
    assert len(frames) == 6 and all(n >= 3 for n in frames), frames


@pytest.mark.slow
def test_showcase_npt_examples_hold(scratch, capsys):
    """README's NPT examples at their full length end 'done' with the packaged model (at 900 K they ended in a
    volume blow-up): the Python call (2,000 steps) and the command line's ms25_npt preset (1,000 steps)."""
    import geodite_sim as gs
    from geodite_sim.cli import main

    model = gs.load_model()
    (npt,) = gs.run_md("examples/structures/NaCl_rocksalt_2x2x2.cif", model, ensemble="npt_mtk", temperature=600,
                       pressure=0.0, timestep=1.0, steps=2000, progress=False)
    assert npt.status == "done" and npt.n_steps == 2000, npt.error
    assert main(["md", "run", "examples/structures/NaCl_rocksalt_2x2x2.cif", "--preset", "ms25_npt", "--temperature",
                 "600", "--steps", "1000", "--no-progress"]) == 0
    assert "1 input(s): 1 done, 0 failed" in capsys.readouterr().out
