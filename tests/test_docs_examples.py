"""Every fenced Python and shell example of README.md and docs/*.md runs as written.

The blocks are discovered, not listed here. What happens to each fence, by its language:

- ```python: executed. The blocks of one file share one namespace, in order (as a reader
  pastes them one after another). They talk to a real server process on loopback serving
  the documented names: `BAAI/bge-m3` (the BGE-M3-shaped test model, with the
  `org/bge-m3-legal-lora` adapter under its adapter root) and
  `sentence-transformers/all-MiniLM-L6-v2` (real weights).
- ```bash / ```sh / ```shell / ```console: each command (`\\` continuations joined, `#`
  comments and a leading `$ ` dropped) is run: `curl ...` against that server (with
  `--fail-with-body`, so an HTTP error fails); `sie-server serve ...` and `./scripts/serve
  ...` (the script is set-up plus `sie-server serve`) start a real server with those flags
  plus `--host 127.0.0.1 --port FREE --device cpu`, wait until it is ready, stop it with
  SIGTERM and expect exit status 0; other `sie-server ...` commands must exit 0. A command of
  any other kind fails the test unless the block is marked as skipped.
- Any other fence (JSON bodies, YAML, synopses, output) is data, not run, unless marked.

Placeholders the docs use are rewritten: `localhost:8080` -> the test server's address,
`/models/bge-m3` -> the test model's folder.

Markers, an HTML comment on the line(s) right before the fence:
- `<!-- docs-test: skip (why) -->`: not run (a GPU, hub downloads, a Ray cluster, `pip
  install`, a benchmark); the reason is required.
- `<!-- docs-test: request POST /v1/score/BAAI/bge-m3 -->` on a ```json fence: the body is
  sent there and must get a 2xx answer.
- `<!-- docs-test: file examples/catalog.yaml -->`: the fence must equal that file.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
from conftest import ROOT, free_port

DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
PYTHON = {"python", "py", "python3"}
SHELL = {"bash", "sh", "shell", "console", "zsh"}
_FENCE = re.compile(r"^(?P<indent> {0,3})(?P<fence>`{3,}|~{3,})\s*(?P<lang>[\w+-]*)[^\n]*$")
_MARKER = re.compile(r"^\s*<!--\s*docs-test:\s*(?P<what>.*?)\s*-->\s*$")


@dataclass(frozen=True)
class Block:
    path: Path
    line: int  # 1-based line of the opening fence
    lang: str
    code: str
    marker: str | None  # the text after `docs-test:` of a marker right before the fence

    @property
    def where(self) -> str:
        return f"{self.path.relative_to(ROOT)}:{self.line}"


def blocks(path: Path) -> list[Block]:
    """The fenced blocks of a Markdown file, with the marker written right before each."""
    lines = path.read_text().splitlines()
    out, i = [], 0
    while i < len(lines):
        m = _FENCE.match(lines[i])
        if not m:
            i += 1
            continue
        j = i - 1
        while j >= 0 and not lines[j].strip():
            j -= 1
        marker = _MARKER.match(lines[j]) if j >= 0 else None
        fence, indent, start = m["fence"], m["indent"], i
        i += 1
        body = []
        while i < len(lines) and not lines[i].strip().startswith(fence):
            line = lines[i]  # a fence inside a list item: its lines carry the same indent
            body.append(line[len(indent):] if line.startswith(indent) else line.lstrip())
            i += 1
        i += 1
        out.append(Block(path, start + 1, m["lang"].lower(), "\n".join(body) + "\n",
                         marker["what"] if marker else None))
    return out


ALL = [b for p in DOCS for b in blocks(p)]
EXAMPLES = [b for b in ALL if b.lang in PYTHON | SHELL or b.marker]


def test_the_docs_have_examples() -> None:
    """Guard against a parser that finds nothing (then nothing below would run)."""
    assert sum(b.lang in PYTHON for b in EXAMPLES) >= 3
    assert any(b.path.name == "README.md" for b in EXAMPLES)


def test_the_runner_reads_fences_markers_and_commands(tmp_path: Path) -> None:
    doc = tmp_path / "doc.md"
    doc.write_text("1. a step\n\n   <!-- docs-test: skip (needs a GPU) -->\n\n   ```python\n"
                   "   if True:\n       x = 1\n   ```\n\n```bash\n$ curl -s \\\n"
                   "    http://localhost:8080/healthz  # ok\npip install sie\n```\n")
    py, sh = blocks(doc)
    assert (py.line, py.lang, py.code, py.marker) == (5, "python", "if True:\n    x = 1\n",
                                                      "skip (needs a GPU)")
    assert sh.marker is None and commands(sh.code) == [
        "curl -s      http://localhost:8080/healthz  # ok", "pip install sie"]
    assert [runnable(c) for c in commands(sh.code)] == [True, False]
    assert runnable("SIE_API_KEYS=k sie-server serve --port 1") and runnable("./scripts/serve")


@pytest.fixture(scope="module")
def placeholders(bge_m3_server, bge_m3_dir: Path) -> dict[str, str]:
    return {"localhost:8080": bge_m3_server.url.removeprefix("http://"),
            "/models/bge-m3": str(bge_m3_dir)}


def rewrite(code: str, placeholders: dict[str, str]) -> str:
    for old, new in placeholders.items():
        code = code.replace(old, new)
    return code


# --- Python ----------------------------------------------------------------------------------

_NAMESPACES: dict[Path, tuple[dict, set[int]]] = {}


def run_python(block: Block, placeholders: dict[str, str]) -> None:
    """Run `block` in its file's namespace, after the file's earlier Python blocks."""
    namespace, done = _NAMESPACES.setdefault(block.path, ({"__name__": "__docs__"}, set()))
    for b in blocks(block.path):
        if b.lang not in PYTHON or b.marker or b.line in done:
            continue
        if b.line > block.line:
            break
        done.add(b.line)
        exec(compile(rewrite(b.code, placeholders), b.where, "exec"), namespace)


# --- shell -----------------------------------------------------------------------------------

def commands(code: str) -> list[str]:
    """The commands of a shell block: continuations joined, prompts and blank lines dropped."""
    joined = re.sub(r"\\\n", " ", code)
    out = []
    for line in joined.splitlines():
        line = line.strip().removeprefix("$ ")
        if line and not line.startswith("#"):
            out.append(line)
    return out


def _env_and_words(command: str) -> tuple[dict[str, str], list[str]]:
    words = shlex.split(command, comments=True)
    env = {}
    while words and re.match(r"^[A-Za-z_]\w*=", words[0]):
        key, _, value = words.pop(0).partition("=")
        env[key] = value
    return env, words


def runnable(command: str) -> bool:
    _, words = _env_and_words(command)
    return bool(words) and words[0] in ("curl", "sie-server", "./scripts/serve", "scripts/serve")


def serve_briefly(args: list[str], env: dict[str, str], where: str) -> None:
    """`sie-server serve ARGS` on a free loopback port: ready, then SIGTERM, exit 0."""
    port = free_port()
    log = tempfile.TemporaryFile("w+")  # read on failure, gone after (no files left in /tmp)
    proc = subprocess.Popen(
        [sys.executable, "-m", "sie_server.cli", "serve", *args, "--host", "127.0.0.1",
         "--port", str(port), "--device", "cpu"], cwd=ROOT, stdout=log, stderr=subprocess.STDOUT,
        env={**os.environ, "PYTHONPATH": str(ROOT / "src"), "HF_HUB_OFFLINE": "1", **env})
    try:
        deadline = time.monotonic() + 180
        while True:
            assert proc.poll() is None, f"{where}: the server exited with {proc.returncode}"
            try:
                if httpx.get(f"http://127.0.0.1:{port}/readyz", timeout=1).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert time.monotonic() < deadline, f"{where}: the server was not ready in 180 s"
            time.sleep(0.2)
        proc.terminate()
        assert proc.wait(60) == 0, f"{where}: the server exited with {proc.returncode}"
    except AssertionError:
        log.seek(0)
        raise AssertionError(f"{where}: server output:\n{log.read()[-4000:]}") from None
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        log.close()


def run_command(command: str, where: str) -> None:
    env, words = _env_and_words(command)
    if words[0] == "curl":
        run = subprocess.run(["curl", "-sS", "--fail-with-body", "--max-time", "120", *words[1:]],
                             cwd=ROOT, capture_output=True, text=True, env={**os.environ, **env})
        assert run.returncode == 0, f"{where}: {command}\n{run.stdout}{run.stderr}"
        return
    args = words[1:] if words[0] == "sie-server" else ["serve", *words[1:]]
    if args[:1] == ["serve"]:
        serve_briefly(args[1:], env, where)
        return
    run = subprocess.run([sys.executable, "-m", "sie_server.cli", *args], cwd=ROOT,
                         capture_output=True, text=True, timeout=120,
                         env={**os.environ, "PYTHONPATH": str(ROOT / "src"), **env})
    assert run.returncode == 0, f"{where}: {command}\n{run.stdout}{run.stderr}"


# --- the test --------------------------------------------------------------------------------

@pytest.mark.slow
@pytest.mark.parametrize("block", EXAMPLES, ids=[b.where for b in EXAMPLES])
def test_doc_example_runs(block: Block, placeholders: dict[str, str], bge_m3_server) -> None:
    marker = block.marker or ""
    if marker.startswith("skip"):
        reason = re.fullmatch(r"skip\s*\((.+)\)", marker)
        assert reason, f"{block.where}: a skip marker needs a reason: docs-test: skip (why)"
        pytest.skip(f"{block.where}: {reason[1]}")
    if marker.startswith("file "):
        expected = (ROOT / marker.removeprefix("file ").strip()).read_text()
        assert block.code == expected, f"{block.where} differs from {marker[5:]}"
        return
    if marker.startswith("request "):
        method, path = marker.removeprefix("request ").split()
        r = httpx.request(method, bge_m3_server.url + path, json=json.loads(block.code),
                          timeout=120)
        assert r.is_success, f"{block.where}: {method} {path} -> {r.status_code} {r.text}"
        return
    assert not marker, f"{block.where}: unknown marker 'docs-test: {marker}'"
    if block.lang in PYTHON:
        run_python(block, placeholders)
        return
    code = rewrite(block.code, placeholders)
    cmds = commands(code)
    unrunnable = [c for c in cmds if not runnable(c)]
    assert not unrunnable, (
        f"{block.where}: `{unrunnable[0]}` is neither run by this test (curl, sie-server, "
        "./scripts/serve) nor marked: put <!-- docs-test: skip (why) --> before the fence")
    for c in cmds:
        run_command(c, block.where)
