"""Every reference to a file of this repository, and to a heading of a markdown file, resolves.

The code, tests, docs, configs, benchmarks, notebooks, launch scripts and README.md cite each
other by path (`neo_jax/ops/masks.py`, `docs/reference/neo.md#native-rope`), by bare
upper-case name (README.md) and by relative markdown link. A cited file that was moved,
renamed or misspelt, or a heading that was reworded, leaves a reader with nothing to follow;
so does a section number of the developer notes, which are not in the repository ("spec"
followed by a number). The test lists every such reference with its file and line.

Not checked: paths of other repositories, written `owner/repo:path` or inside a URL; globs and
templates (`configs/*.py`, `neo_{2b,9b}`, `<step>`); placeholders named by one capital letter
or by a Python file name in capitals (`configs/X.py`, `configs/STAGE.py`).
"""

from __future__ import annotations

import json
import pathlib
import re
from collections.abc import Iterator
from typing import NamedTuple

ROOT = pathlib.Path(__file__).resolve().parent.parent
SCANNED = ("neo_jax", "tests", "docs", "configs", "benchmarks", "notebooks", "launch", "README.md")
# top-level folders whose paths count as references (spec and seeds are not in the repository,
# so a path under them always fails)
TOP_LEVEL = (
  "neo_jax",
  "tests",
  "docs",
  "configs",
  "benchmarks",
  "notebooks",
  "launch",
  "spec",
  "seeds",
)
TEXT_SUFFIXES = {".py", ".md", ".ipynb", ".sh", ".sbatch", ".txt", ".toml", ".yaml", ".yml", ".cfg"}
SKIPPED_DIRS = {"__pycache__", ".venv", "workdir", "node_modules"}

_NOT_BEFORE = r"(?<![\w./:@~$\\-])"  # not inside a longer path, URL or `owner/repo:path`
_NOT_AFTER = r"(?![\w./\\{}*<>$\[-])"  # not a glob or a template (`neo_{2b,9b}.py`, `<step>`)
PATH_RE = re.compile(
  _NOT_BEFORE
  + r"((?:"
  + "|".join(TOP_LEVEL)
  + r")(?:/[\w.-]+)+/?)"
  + r"(?:#([\w-]+))?"
  + _NOT_AFTER
)
BARE_MD_RE = re.compile(_NOT_BEFORE + r"([A-Z][A-Z0-9_]*\.md)(?:#([\w-]+))?" + _NOT_AFTER)
LINK_RE = re.compile(r"\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")
# the developer notes, cited by section number or as a document of their own
SPEC_SECTION_RE = re.compile(
  r"\bspec(?:'s)?\s+(?:section\s+|§\s*)?\d+(?:\.\d+)*"
  r"|\b[Tt]he spec(?:'s)?(?![\w/-])"
)
# configs/X.py, configs/STAGE.py (no module of this repository is named in capitals)
PLACEHOLDER_RE = re.compile(r"(?:^|/)(?:[A-Z](?:\.\w+)?|[A-Z][A-Z0-9_]*\.py)/?$")
URL_SCHEME_RE = re.compile(r"^[a-zA-Z][a-zA-Z0-9+.-]*:")
HEADING_RE = re.compile(r"^ {0,3}(#{1,6})[ \t]+(.*?)[ \t]*#*[ \t]*$")
HTML_ANCHOR_RE = re.compile(r"<a\s+(?:id|name)=[\"']([^\"']+)[\"']", re.IGNORECASE)
FENCE_RE = re.compile(r"^ {0,3}(```|~~~)")


class Reference(NamedTuple):
  source: pathlib.Path  # the citing file
  line: int
  text: str  # as written
  target: pathlib.Path | None  # the file it names (None: a document that cannot exist here)
  anchor: str | None


# --- markdown headings -----------------------------------------------------------------------


def slug(heading: str) -> str:
  """GitHub's anchor of a heading: lower case, punctuation dropped, spaces to hyphens."""
  text = re.sub(r"\[([^\]]*)\]\([^)]*\)", r"\1", heading)  # a link reads as its text
  text = re.sub(r"<[^>]+>", "", text).strip().lower()
  text = re.sub(r"[^\w\- ]", "", text)
  return text.replace(" ", "-")


def anchors(markdown: str) -> set[str]:
  """Every anchor a markdown file defines: heading slugs (duplicates numbered) and <a id>."""
  found: set[str] = set()
  seen: dict[str, int] = {}
  in_fence = False
  for line in markdown.splitlines():
    if FENCE_RE.match(line):
      in_fence = not in_fence
      continue
    if in_fence:
      continue
    found.update(HTML_ANCHOR_RE.findall(line))
    match = HEADING_RE.match(line)
    if match:
      base = slug(match.group(2))
      count = seen.get(base, 0)
      seen[base] = count + 1
      found.add(base if count == 0 else f"{base}-{count}")
  return found


# --- scanning --------------------------------------------------------------------------------


def scanned_files(root: pathlib.Path) -> Iterator[pathlib.Path]:
  for name in SCANNED:
    path = root / name
    if path.is_file():
      yield path
    elif path.is_dir():
      for file in sorted(path.rglob("*")):
        parts = file.relative_to(root).parts
        if any(p in SKIPPED_DIRS or p.startswith(".") for p in parts):
          continue
        if file.is_file() and file.suffix in TEXT_SUFFIXES:
          yield file


def text_lines(path: pathlib.Path) -> list[tuple[int, str, bool]]:
  """(line number, line, is markdown) of a file; a notebook's cells, numbered through."""
  raw = path.read_text(encoding="utf-8")
  if path.suffix != ".ipynb":
    return [(i, line, path.suffix == ".md") for i, line in enumerate(raw.splitlines(), 1)]
  out: list[tuple[int, str, bool]] = []
  for cell in json.loads(raw).get("cells", []):
    source = cell.get("source", "")
    source = "".join(source) if isinstance(source, list) else source
    markdown = cell.get("cell_type") == "markdown"
    out.extend((len(out) + 1, line, markdown) for line in source.splitlines())
  return out


def references(path: pathlib.Path, root: pathlib.Path) -> Iterator[Reference]:
  """Every reference to a repository file in one file."""
  lines = text_lines(path)
  for index, (number, line, markdown) in enumerate(lines):
    for match in PATH_RE.finditer(line):
      target = match.group(1).rstrip(".")
      if PLACEHOLDER_RE.search(target):
        continue
      yield Reference(path, number, match.group(0).rstrip("."), root / target, match.group(2))
    for match in BARE_MD_RE.finditer(line):
      name = match.group(1)
      beside = path.parent / name
      yield Reference(
        path, number, match.group(0), beside if beside.exists() else root / name, match.group(2)
      )
    for match in SPEC_SECTION_RE.finditer(line):
      yield Reference(path, number, match.group(0), None, None)
    if index + 1 < len(lines):  # "spec" at the end of a line, its number on the next
      end = len(line.rstrip())
      joined = line[:end] + " " + lines[index + 1][1].lstrip(" #*")
      for match in SPEC_SECTION_RE.finditer(joined):
        if match.start() < end < match.end():
          yield Reference(path, number, match.group(0), None, None)
    if markdown:
      for match in LINK_RE.finditer(line):
        target = match.group(1)
        if URL_SCHEME_RE.match(target):
          continue
        file_part, _, anchor = target.partition("#")
        resolved = path if not file_part else (path.parent / file_part)
        yield Reference(path, number, target, resolved, anchor or None)


def problem(ref: Reference, anchor_cache: dict[pathlib.Path, set[str]]) -> str | None:
  """Why the reference does not resolve, or None."""
  if ref.target is None:
    return "cites a document that is not in the repository"
  if not ref.target.exists():
    return "no such file"
  if ref.anchor and ref.target.suffix == ".md":
    if ref.target not in anchor_cache:
      anchor_cache[ref.target] = anchors(ref.target.read_text(encoding="utf-8"))
    if ref.anchor not in anchor_cache[ref.target]:
      return f"no heading with anchor #{ref.anchor}"
  return None


def broken_references(root: pathlib.Path = ROOT) -> list[str]:
  cache: dict[pathlib.Path, set[str]] = {}
  out = []
  for path in scanned_files(root):
    for ref in references(path, root):
      why = problem(ref, cache)
      if why:
        out.append(f"{path.relative_to(root)}:{ref.line}: {ref.text} ({why})")
  return out


# --- the repository --------------------------------------------------------------------------


def test_every_reference_resolves():
  broken = broken_references()
  assert not broken, (
    f"{len(broken)} reference(s) to files or headings that do not exist:\n" + "\n".join(broken)
  )


# --- the scanner itself ----------------------------------------------------------------------


def _write(root: pathlib.Path, name: str, text: str) -> None:
  path = root / name
  path.parent.mkdir(parents=True, exist_ok=True)
  path.write_text(text, encoding="utf-8")


def test_scanner_finds_typos_missing_files_and_missing_headings(tmp_path):
  """Code, markdown and notebooks: what must be reported and what must not."""
  # paths are assembled from parts so that this file itself cites nothing that is missing
  docs, code = "docs", "neo_jax"
  _write(
    tmp_path,
    f"{docs}/guide.md",
    "# Guide\n\n## Native-RoPE\n\n## Stage recipes\n\n## Stage recipes\n\n"
    "```\n## not a heading\n```\n\n[next](other.md) [up](#guide) [gone](#not-here)\n",
  )
  _write(tmp_path, f"{code}/real.py", "")
  body = "\n".join(
    [
      f"see {docs}/guide.md#native-rope and {docs}/guide.md#stage-recipes-1",  # fine
      f"see {docs}/giude.md",  # typo'd file
      f"see {docs}/guide.md#native-rpoe",  # typo'd heading
      f"see {docs}/guide.md#not-a-heading",  # a line inside a code fence is no heading
      f"uses {code}/real.py, then {code}/real.py.",  # fine, sentence full stop included
      f"uses {code}/missing.py and {code}/real/ and {docs}/GONE.md",  # missing file, folder
      "DESIGN" + ".md says so; README" + ".md too",  # missing bare names
      "as in " + "spec" + " 5.1 and the " + "spec" + "/neo.md notes",  # not in the repository
      "from the (" + "spec",  # the number on the next line
      "  # 5.4) the mesh spec",
      "from the " + "spec's formulas; a mesh spec, the specification",  # only the first counts
      f"ignored: owner/repo:{docs}/x.md, https://github.com/o/r/blob/main/{docs}/x.md,",
      f"ignored: {code}/*.py, configs/neo_{{2b,9b}}.py, {docs}/, {code}/X.py, configs/STAGE.py:M",
    ]
  )
  _write(tmp_path, f"{code}/user.py", body)
  notebook = {
    "cells": [
      {
        "cell_type": "markdown",
        "source": [f"[ok](../{docs}/guide.md#native-rope)\n", "[gone](missing.md)"],
      },
      {"cell_type": "code", "source": f"# see {docs}/giude.md", "outputs": []},
    ]
  }
  nb = "/".join(("notebooks", "demo.ipynb"))
  _write(tmp_path, nb, json.dumps(notebook))

  broken = broken_references(tmp_path)
  expected = [
    f"{docs}/guide.md:13: #not-here (no heading with anchor #not-here)",
    f"{docs}/guide.md:13: other.md (no such file)",
    f"{code}/user.py:2: {docs}/giude.md (no such file)",
    f"{code}/user.py:3: {docs}/guide.md#native-rpoe (no heading with anchor #native-rpoe)",
    f"{code}/user.py:4: {docs}/guide.md#not-a-heading (no heading with anchor #not-a-heading)",
    f"{code}/user.py:6: {code}/missing.py (no such file)",
    f"{code}/user.py:6: {code}/real/ (no such file)",
    f"{code}/user.py:6: {docs}/GONE.md (no such file)",
    f"{code}/user.py:7: DESIGN" + ".md (no such file)",
    f"{code}/user.py:7: README" + ".md (no such file)",
    f"{code}/user.py:8: " + "spec" + "/neo.md (no such file)",
    f"{code}/user.py:8: " + "spec" + " 5.1 (cites a document that is not in the repository)",
    f"{code}/user.py:9: " + "spec" + " 5.4 (cites a document that is not in the repository)",
    f"{code}/user.py:11: the " + "spec's (cites a document that is not in the repository)",
    f"{nb}:2: missing.md (no such file)",
    f"{nb}:3: {docs}/giude.md (no such file)",
  ]
  assert sorted(broken) == sorted(expected)


def test_slugs_follow_github():
  assert slug("Native-RoPE") == "native-rope"
  assert slug("Stages: which parameters train") == "stages-which-parameters-train"
  assert slug("The batch (contract between data and model)") == (
    "the-batch-contract-between-data-and-model"
  )
  assert slug("HF `config.json`") == "hf-configjson"
  assert slug("See [the table](x.md) below") == "see-the-table-below"
  assert anchors('# A\n## A\n<a id="custom"></a>\n') == {"a", "a-1", "custom"}
