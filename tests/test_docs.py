"""The documentation works as written: the generated reference pages are current and cover every
setting, command and route; the site builds in strict mode (every link and anchor resolves); and
the quickstart and serve-your-own-model pages, run block by block, do what they say.

The doc test of a page (``test_page_runs_as_written``) follows the convention of the pages:

- a ```` ```bash ```` block preceded by ``<!-- doc-test: background -->`` (``./run-bastion``) is
  started in the background, in its own process group, and the test waits until it prints
  "Press Ctrl-C to stop.";
- a block preceded by ``<!-- doc-test: skip (reason) -->`` is not run;
- every other bash block runs, in page order, in ONE ``bash -euo pipefail`` process (so variables
  such as ``KEY`` carry from block to block), with the repository root as working directory;
  the first block that fails stops the run and is reported with its line in the page and its
  output. ```` ```console ```` and ```` ```text ```` blocks are sample output and never run.

Each page runs against its own fresh installation, never the user's ``~/.bastion``: the
background block and the other blocks get ``BASTION_DATA_DIR`` (a new temporary directory),
``BASTION_GATEWAY_PORT`` and ``BASTION_CONTROL_PORT`` (free ports) and free metrics ports in their
environment, and ``BASTION_GATEWAYS=2`` / ``BASTION_WORKERS=1`` so the run weighs the same on any
machine. The pages address the servers as ``127.0.0.1:8000`` (gateway) and ``127.0.0.1:8001``
(admin API); the test substitutes the chosen ports into the block text before running it, and
nothing else. Afterwards the background process gets SIGINT (Ctrl-C) and must print
"Bastion stopped." and exit 0.
"""

from __future__ import annotations

import importlib.util
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest

from bastion.embedded.redis_server import free_port
from tests.support import default_sigint

ROOT = Path(__file__).resolve().parent.parent
DOCS = ROOT / "docs"
BIN = Path(sys.executable).parent
READY = "Press Ctrl-C to stop."
STOPPED = "Bastion stopped."
START_TIMEOUT_S = 180  # a first start may set up .venv's stamp; a cold import of the stack takes ~20 s
PAGE_TIMEOUT_S = 480


def _generator() -> ModuleType:
    spec = importlib.util.spec_from_file_location("gen_docs", ROOT / "scripts" / "gen_docs.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


# the reference pages -----------------------------------------------------------------------
def test_the_generated_reference_pages_are_current() -> None:
    """``scripts/gen_docs.py --check`` (a fresh process, as CI runs it) finds nothing to rewrite."""
    result = subprocess.run(
        [sys.executable, "scripts/gen_docs.py", "--check"], cwd=ROOT, capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, f"{result.stderr}\nregenerate: .venv/bin/python scripts/gen_docs.py"


def test_the_check_names_a_stale_page(tmp_path: Path) -> None:
    """``--check`` exits 1 and names each page that differs (here: one edited, two missing)."""
    (tmp_path / "settings.md").write_text((DOCS / "reference" / "settings.md").read_text() + "edited\n")
    result = subprocess.run(
        [sys.executable, "scripts/gen_docs.py", "--check", "--dir", str(tmp_path)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 1
    for name in ("settings.md", "cli.md", "api.md"):
        assert f"stale: {tmp_path / name}" in result.stderr
    assert (tmp_path / "settings.md").read_text().endswith("edited\n")  # --check writes nothing


def test_the_reference_pages_cover_every_setting_command_and_route() -> None:
    import typer

    from bastion.cli import app
    from bastion.control.app import create_app as control_app
    from bastion.gateway.app import create_app as gateway_app
    from bastion.settings import Settings

    gen = _generator()
    pages = {path.name: text for path, text in gen.build().items()}
    for name in Settings.model_fields:
        assert f"`BASTION_{name.upper()}`" in pages["settings.md"], name
        assert f"`--{name.replace('_', '-')}`" in pages["settings.md"], name

    def commands(command: Any, ctx: Any, path: list[str]) -> Iterator[str]:
        yield " ".join(path)
        for name in getattr(command, "list_commands", lambda _ctx: [])(ctx):
            sub = command.get_command(ctx, name)
            if not sub.hidden:
                yield from commands(sub, sub.context_class(sub, info_name=name, parent=ctx), [*path, name])

    root = typer.main.get_command(app)
    for path in commands(root, root.context_class(root, info_name="bastion"), ["bastion"]):
        assert re.search(rf"^#+ {re.escape(path)}$", pages["cli.md"], re.M), path
    settings = Settings(data_dir=Path("/nonexistent"))
    for make in (gateway_app, control_app):
        for route, ops in make(settings).openapi()["paths"].items():
            for method in ops:
                assert f"#### {method.upper()} {route}\n" in pages["api.md"], (method, route)


def test_the_site_builds_in_strict_mode(tmp_path: Path) -> None:
    """``mkdocs build --strict``: every page in the navigation, every link and anchor resolves."""
    result = subprocess.run(
        [str(BIN / "mkdocs"), "build", "--strict", "--site-dir", str(tmp_path / "site")],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert (tmp_path / "site" / "quickstart" / "index.html").exists()


# the doc test -------------------------------------------------------------------------------
@dataclass(frozen=True)
class Block:
    line: int  # of the opening fence, 1-based
    code: str
    mode: str  # "run", "background" or "skip"


def bash_blocks(text: str) -> list[Block]:
    """The page's ```bash blocks, each with the directive on the line before it (if any)."""
    blocks, lines, i = [], text.splitlines(), 0
    while i < len(lines):
        if lines[i].strip() != "```bash":
            i += 1
            continue
        previous = next((lines[j].strip() for j in range(i - 1, -1, -1) if lines[j].strip()), "")
        mode = "run"
        if previous.startswith("<!-- doc-test:"):
            directive = previous.removeprefix("<!-- doc-test:").removesuffix("-->").strip()
            mode = "background" if directive == "background" else "skip" if directive.startswith("skip") else ""
            assert mode, f"line {i}: unknown doc-test directive {previous!r}"
        end = lines.index("```", i + 1)
        blocks.append(Block(i + 1, "\n".join(lines[i + 1 : end]), mode))
        i = end + 1
    return blocks


def _port_run(count: int) -> int:
    """The first of ``count`` consecutive free ports (gateway i's metrics port is base + i)."""
    for _ in range(100):
        base = free_port()
        if base + count > 65535:
            continue
        try:
            for port in range(base, base + count):
                with socket.socket() as sock:
                    sock.bind(("127.0.0.1", port))
        except OSError:
            continue
        return base
    raise AssertionError("no run of free ports")


class Installation:
    """The environment and port substitution shared by a page's background and foreground blocks."""

    def __init__(self, data_dir: Path) -> None:
        self.gateway_port, self.control_port = free_port(), free_port()
        self.env = {k: v for k, v in os.environ.items() if not k.startswith("BASTION_")}
        self.env.update(
            {
                "BASTION_DATA_DIR": str(data_dir),
                "BASTION_GATEWAY_PORT": str(self.gateway_port),
                "BASTION_CONTROL_PORT": str(self.control_port),
                "BASTION_GATEWAY_METRICS_PORT": str(_port_run(2)),
                "BASTION_WORKER_METRICS_PORT": str(_port_run(1)),
                "BASTION_GATEWAYS": "2",
                "BASTION_WORKERS": "1",
                "PYTHONUNBUFFERED": "1",
            }
        )
        self.background: subprocess.Popen[str] | None = None
        self.output: list[str] = []
        self._ready = threading.Event()

    def substitute(self, code: str) -> str:
        return code.replace("127.0.0.1:8000", f"127.0.0.1:{self.gateway_port}").replace(
            "127.0.0.1:8001", f"127.0.0.1:{self.control_port}"
        )

    def start(self, block: Block) -> None:
        assert self.background is None, f"line {block.line}: a second background block"
        self.background = subprocess.Popen(
            ["bash", "-euo", "pipefail", "-c", self.substitute(block.code)],
            cwd=ROOT,
            env=self.env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            start_new_session=True,  # its own process group: Ctrl-C reaches it and nothing else
            preexec_fn=default_sigint,  # Ctrl-C reaches it even under a backgrounded pytest
        )
        threading.Thread(target=self._read, daemon=True).start()
        deadline = time.monotonic() + START_TIMEOUT_S
        while not self._ready.wait(0.2):
            if self.background.poll() is not None or time.monotonic() > deadline:
                time.sleep(0.5)  # the reader's last lines
                raise AssertionError(
                    f"line {block.line}: {block.code!r} did not print {READY!r} "
                    f"(exit status {self.background.poll()}):\n{''.join(self.output)}"
                )

    def _read(self) -> None:
        assert self.background is not None and self.background.stdout is not None
        for line in self.background.stdout:
            self.output.append(line)
            if READY in line:
                self._ready.set()

    def stop(self) -> None:
        """Ctrl-C: SIGINT to the background block's process group; it must stop cleanly."""
        if self.background is None:
            return
        if self.background.poll() is None:
            os.killpg(self.background.pid, signal.SIGINT)
        try:
            code = self.background.wait(90)
        except subprocess.TimeoutExpired:
            os.killpg(self.background.pid, signal.SIGKILL)
            self.background.wait()
            if self.background.stdout is not None:
                self.background.stdout.close()
            raise AssertionError(f"the background block did not stop on Ctrl-C:\n{''.join(self.output)}") from None
        time.sleep(0.2)  # the reader's last lines
        if self.background.stdout is not None:
            self.background.stdout.close()
        assert code == 0 and STOPPED in "".join(self.output), f"exit status {code}:\n{''.join(self.output)}"


def run_page(page: Path, install: Installation) -> str:
    """Run the page's blocks (see the module's docstring); return the foreground output."""
    blocks = bash_blocks(page.read_text())
    assert blocks, f"{page.name} has no bash blocks"
    script = []
    for index, block in enumerate(blocks):
        if block.mode == "background":
            assert not script, (
                f"{page.name} line {block.line}: the background block must come before the blocks it serves"
            )
            install.start(block)
        elif block.mode == "run":
            assert not block.code.rstrip().endswith("\\"), f"{page.name} line {block.line}: a block ends in '\\'"
            script += [
                f"printf '\\n@@block {index} start@@\\n'",
                install.substitute(block.code),
                f"printf '\\n@@block {index} ok@@\\n'",
            ]
    assert install.background is not None, f"{page.name} has no background block (./run-bastion)"
    process = subprocess.Popen(
        ["bash", "-euo", "pipefail", "-c", "\n".join(script)],
        cwd=ROOT,
        env=install.env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )
    try:
        output, _ = process.communicate(timeout=PAGE_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        output, _ = process.communicate()
    finished = {int(n) for n in re.findall(r"@@block (\d+) ok@@", output)}
    for index, block in enumerate(blocks):
        if block.mode == "run" and index not in finished:
            start = output.rfind(f"@@block {index} start@@")
            shown = output[start:] if start >= 0 else output
            background = "".join(install.output)[-3000:]
            pytest.fail(
                f"{page.name}, the bash block at line {block.line} failed (exit status {process.returncode}):\n"
                f"{block.code}\n--- its output ---\n{shown[-6000:]}\n--- the background block ---\n{background}"
            )
    assert process.returncode == 0, output
    return output


def _section(output: str, block: int) -> str:
    return output.split(f"@@block {block} start@@")[1].split(f"@@block {block} ok@@")[0]


def test_the_doc_runner_carries_variables_skips_and_reports_the_failing_block(tmp_path: Path) -> None:
    """The runner itself: a background block waited for and stopped with Ctrl-C, a skipped block not
    run, a variable carried between blocks, the ports substituted, and the first failing block
    reported by its line, with nothing after it run."""
    page = tmp_path / "page.md"
    page.write_text(
        "<!-- doc-test: background -->\n```bash\n"
        "trap 'echo \"Bastion stopped.\"; exit 0' INT; echo 'Press Ctrl-C to stop.'; while true; do sleep 0.1; done\n"
        "```\n\n<!-- doc-test: skip (never run) -->\n```bash\nexit 3\n```\n\n"
        "```bash\nX=http://127.0.0.1:8000\n```\n\n```console\nexit 4\n```\n\n"
        '```bash\n[ "${X##*:}" = "$BASTION_GATEWAY_PORT" ]\n```\n\n```bash\nfalse\n```\n\n```bash\necho never\n```\n'
    )
    assert [b.mode for b in bash_blocks(page.read_text())] == ["background", "skip", "run", "run", "run", "run"]
    install = Installation(tmp_path / "data")
    try:
        with pytest.raises(pytest.fail.Exception) as failed:
            run_page(page, install)
    finally:
        install.stop()
    report = str(failed.value)
    assert "the bash block at line 23 failed" in report  # `false`: X carried, its port substituted
    assert "never" not in report.split("--- its output ---")[1].split("--- the background block ---")[0]


@pytest.mark.timeout(START_TIMEOUT_S + PAGE_TIMEOUT_S + 120)
def test_the_quickstart_runs_as_written(tmp_path: Path) -> None:
    """From ./run-bastion to a key, a prediction, an async job and bastion doctor, then Ctrl-C."""
    install = Installation(tmp_path / "data")
    try:
        output = run_page(DOCS / "quickstart.md", install)
    finally:
        install.stop()
    blocks = bash_blocks((DOCS / "quickstart.md").read_text())
    assert "Your first API key" in "".join(install.output)
    assert re.search(r'"status":"succeeded","version":1,"created_at":"\d{4}-\d\d-\d\dT[\d:.]+Z"', output)
    assert '"outputs":{"label":[0]' in output
    assert '"title":"Invalid input","status":400' in output
    doctor = next(i for i, b in enumerate(blocks) if "bastion doctor" in b.code)
    assert "FAIL" not in _section(output, doctor)


@pytest.mark.timeout(START_TIMEOUT_S + PAGE_TIMEOUT_S + 120)
def test_serve_your_own_model_runs_as_written(tmp_path: Path) -> None:
    """scikit-learn, PyTorch and an existing ONNX file to predictions; a canary, promotion, rollback."""
    install = Installation(tmp_path / "data")
    try:
        output = run_page(DOCS / "serve-your-own-model.md", install)
    finally:
        install.stop()
        shutil.rmtree(ROOT / "build" / "examples", ignore_errors=True)  # what the page's scripts wrote
    for model in ("iris", "churn", "my-model"):
        assert f'"model":"{model}","version":1,"outputs"' in output, model
    assert "feature 'sepal_length' must be within" in output
    assert '"model_name":"churn","model_version":"1"' in output
    assert "registered iris version 2" in output


# every bastion command line in README.md and docs/ names real commands and options ------------
_INVOCATION = re.compile(r"(?:^|[\s(;&|`])(?:\./)?bastion\s+([a-z][^\n|;&)`#]*)")


def _command_lines(text: str) -> Iterator[tuple[int, str]]:
    """``bastion ...`` / ``./bastion ...`` invocations in the page's bash blocks and inline code."""
    for block in bash_blocks(text):
        joined = block.code.replace("\\\n", " ")
        for offset, line in enumerate(joined.splitlines()):
            for found in _INVOCATION.finditer(line):
                yield block.line + offset, found.group(1)
    for number, line in enumerate(text.splitlines(), 1):
        for span in re.findall(r"`([^`\n]*bastion [^`\n]*)`", line):
            for found in _INVOCATION.finditer(span):
                yield number, found.group(1)


def _check_invocation(root: Any, words: list[str]) -> str | None:
    """None if ``bastion WORDS`` names a command and only its options, else what is wrong."""
    command, path = root, ["bastion"]
    while getattr(command, "commands", None) is not None and words and not words[0].startswith("-"):
        name = words.pop(0)
        if name.isupper():
            return None  # a placeholder: "bastion COMMAND --help"
        sub = command.commands.get(name)
        if sub is None:
            return f"{' '.join(path)} has no command {name!r}"
        command, path = sub, [*path, name]
    if getattr(command, "commands", None) is not None:
        return None  # a group named on its own, as prose does
    options = {opt for param in command.params for opt in (*param.opts, *param.secondary_opts)} | {"--help"}
    for word in words:
        flag = word.split("=", 1)[0]
        if flag.startswith("-") and flag not in options and re.fullmatch(r"--?[a-z][a-z0-9-]*", flag):
            return f"{' '.join(path)} has no option {flag}"
    return None


def test_every_bastion_command_in_the_readme_and_docs_names_real_commands_and_options() -> None:
    import shlex

    from bastion.cli import command

    root = command()
    assert _check_invocation(root, ["keys", "create", "--expiry", "1d"]) == "bastion keys create has no option --expiry"
    assert _check_invocation(root, ["keys", "mint"]) == "bastion keys has no command 'mint'"
    pages = [ROOT / "README.md", *sorted(DOCS.rglob("*.md"))]
    checked, problems = 0, []
    for page in pages:
        for line, text in _command_lines(page.read_text()):
            try:
                words = shlex.split(text, comments=True)
            except ValueError:
                words = text.split()
            problem = _check_invocation(root, words)
            checked += 1
            if problem:
                problems.append(f"{page.relative_to(ROOT)}:{line}: bastion {text.strip()}: {problem}")
    assert checked > 50, f"only {checked} invocations found: is the pattern still right?"
    assert not problems, "\n".join(problems)
