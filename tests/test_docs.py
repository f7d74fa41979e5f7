"""The documentation site: it builds warning-free, documents every public name,
its links resolve, its notebooks carry complete outputs, and every code block
of the README and the docs is run by a test.

The build is the one ``make docs`` runs (``sphinx-build -n -W``: nitpicky,
warnings as errors), into a temporary folder.
"""

from __future__ import annotations

import ast
import html.parser
import json
import pathlib
import re
import subprocess
import sys
import urllib.parse

import pytest

import sam_optax
import sam_optax.flax
import sam_optax.sharpness
from tests.doc_blocks import python_blocks

ROOT = pathlib.Path(__file__).resolve().parent.parent
DOCS = ROOT / "docs"

# Each public module and the API page that documents it.
API_PAGES = {
    "sam_optax": (sam_optax, "sam_optax.md"),
    "sam_optax.perturbations": (sam_optax.perturbations, "perturbations.md"),
    "sam_optax.directions": (sam_optax.directions, "directions.md"),
    "sam_optax.policies": (sam_optax.policies, "policies.md"),
    "sam_optax.sharpness": (sam_optax.sharpness, "sharpness.md"),
    "sam_optax.calibration": (sam_optax.calibration, "calibration.md"),
    "sam_optax.flax": (sam_optax.flax, "flax.md"),
}
MODULES = {"calibration", "directions", "perturbations", "policies", "sharpness"}


def public_names(module_name: str) -> list[str]:
  module, _ = API_PAGES[module_name]
  return [n for n in module.__all__ if not (module is sam_optax and n in MODULES)]


# ----------------------------------------------------------------- sources

def test_every_public_module_has_an_api_page():
  submodules = {f"sam_optax.{n}" for n in MODULES} | {"sam_optax", "sam_optax.flax"}
  assert submodules == set(API_PAGES)
  index = (DOCS / "api" / "index.md").read_text()
  for _, page in API_PAGES.values():
    assert page.removesuffix(".md") in index, page


@pytest.mark.parametrize("module_name", sorted(API_PAGES))
def test_every_public_name_has_an_entry_on_its_modules_page(module_name):
  _, page = API_PAGES[module_name]
  text = (DOCS / "api" / page).read_text()
  assert f".. module:: {module_name}\n" in text
  documented = set(re.findall(
      r"^\.\. (?:autofunction|autoclass|py:class|py:function|autodata)::\s+(\w+)",
      text, flags=re.M))
  missing = sorted(set(public_names(module_name)) - documented)
  assert not missing, f"{page} has no entry for {missing}"


def _notebooks() -> list[pathlib.Path]:
  return sorted((ROOT / "notebooks").glob("*.ipynb"))


@pytest.mark.parametrize("path", _notebooks(), ids=lambda p: p.name)
def test_notebook_is_stored_executed_top_to_bottom(path):
  """The site renders the stored outputs: every code cell ran, in order, once.

  The test suite also executes every notebook (nbmake), so stored outputs
  come from code that still runs.
  """
  cells = [c for c in json.loads(path.read_text())["cells"] if c["cell_type"] == "code"]
  counts = [c.get("execution_count") for c in cells if "".join(c["source"]).strip()]
  assert counts == list(range(1, len(counts) + 1)), (
      f"{path.name}: execution counts {counts}; re-run it top to bottom and save")
  assert any(c.get("outputs") for c in cells), f"{path.name} has no outputs"
  for c in cells:
    for out in c.get("outputs", []):
      assert out.get("output_type") != "error", f"{path.name} stores an error"


def test_every_notebook_is_in_the_site():
  index = (DOCS / "index.md").read_text()
  for path in _notebooks():
    assert f"notebooks/{path.stem}\n" in index, path.name


def _anchors(test_file: pathlib.Path) -> list[str]:
  """The anchors a test module passes to ``_block``/``_run``."""
  text = test_file.read_text()
  found = re.findall(r'_(?:block|run)\(\s*("(?:[^"\\]|\\.)*")', text)
  found += re.findall(r"_(?:block|run)\(\s*('(?:[^'\\]|\\.)*')", text)
  return [ast.literal_eval(a) for a in found]


def test_every_code_block_is_run_by_a_test():
  from tests import test_doc_snippets as snippets

  anchors = _anchors(ROOT / "tests" / "test_doc_snippets.py")
  unclaimed = []
  for page in snippets.SOURCES:
    for block in python_blocks(page):
      if block == snippets.HEADLINE:
        continue  # checked to be part of the quickstart block
      if not any(a in block for a in anchors):
        unclaimed.append(f"{page.relative_to(ROOT)}: {block.splitlines()[0]}")
  assert not unclaimed, "blocks no test runs:\n" + "\n".join(unclaimed)
  # The pages with their own test modules.
  for page in snippets.OWN_TESTS:
    if python_blocks(DOCS / page):
      owner = "test_docs_variants.py" if page.startswith("variants/") else "test_docs_migration.py"
      assert (ROOT / "tests" / owner).exists(), (page, owner)


def test_readme_fits_on_a_few_screens_and_links_into_the_docs():
  readme = (ROOT / "README.md").read_text()
  assert len(readme.splitlines()) <= 250
  for target in re.findall(r"\]\((docs/[^)#]+)", readme):
    assert (ROOT / target).exists(), target


# ----------------------------------------------------------------- the build

class _Links(html.parser.HTMLParser):
  """Collects a page's ids and its relative href/src targets."""

  def __init__(self):
    super().__init__()
    self.ids: set[str] = set()
    self.links: list[str] = []

  def handle_starttag(self, tag, attrs):
    attrs = dict(attrs)
    if attrs.get("id"):
      self.ids.add(attrs["id"])
    if tag == "a" and attrs.get("name"):
      self.ids.add(attrs["name"])
    for key in ("href", "src"):
      value = attrs.get(key)
      if value and not re.match(r"^[a-z]+:|^//", value):
        self.links.append(value)


def _parse(path: pathlib.Path) -> _Links:
  parser = _Links()
  parser.feed(path.read_text(encoding="utf-8"))
  return parser


@pytest.fixture(scope="module")
def site(tmp_path_factory):
  out = tmp_path_factory.mktemp("site")
  proc = subprocess.run(
      [sys.executable, "-m", "sphinx", "-n", "-W", "--keep-going", "-q",
       "-b", "html", "-d", str(out / "doctrees"), str(DOCS), str(out / "html")],
      capture_output=True, text=True, cwd=ROOT, check=False)
  return out / "html", proc


def test_site_builds_warning_free_with_every_api_entry_and_link(site):
  html_dir, proc = site
  assert proc.returncode == 0, proc.stderr[-6000:]
  assert "WARNING" not in proc.stderr, proc.stderr[-6000:]

  # Every public name is an object of the built inventory.
  from sphinx.util.inventory import InventoryFile
  inventory = InventoryFile.loads((html_dir / "objects.inv").read_bytes(), uri="")
  inventory = getattr(inventory, "data", inventory)
  objects = set()
  for kind, entries in inventory.items():
    if kind.startswith("py:"):
      objects.update(entries)
  for module_name in API_PAGES:
    assert module_name in objects, module_name
    missing = [n for n in public_names(module_name) if f"{module_name}.{n}" not in objects]
    assert not missing, f"{module_name}: {missing} not in the built API"

  # Every internal link and image resolves, anchors included.
  pages = {p: _parse(p) for p in html_dir.rglob("*.html") if "_static" not in p.parts}
  broken = []
  for page, parsed in pages.items():
    for link in parsed.links:
      target, _, fragment = urllib.parse.unquote(link).partition("#")
      target = target.split("?")[0]
      path = (page.parent / target).resolve() if target else page
      if path.is_dir():
        path = path / "index.html"
      if not path.exists():
        broken.append(f"{page.relative_to(html_dir)} -> {link}")
      elif fragment and path.suffix == ".html":
        ids = pages[path].ids if path in pages else _parse(path).ids
        if fragment not in ids:
          broken.append(f"{page.relative_to(html_dir)} -> {link} (no such anchor)")
  assert not broken, "\n".join(broken[:40])

  # Math renders from the site itself, without a network.
  api = (html_dir / "api" / "sam_optax.html").read_text(encoding="utf-8")
  script = re.search(r'<script[^>]+src="([^"]*mathjax[^"]*)"', api)
  assert script and not script.group(1).startswith("http"), "MathJax is not served locally"
  assert (html_dir / "api" / script.group(1).split("?")[0]).resolve().exists()
  # A notebook page shows its stored plot.
  nb = (html_dir / "notebooks" / "quickstart.html").read_text(encoding="utf-8")
  images = re.findall(r'<img[^>]+src="([^"]+)"', nb)
  assert any(src.endswith(".png") for src in images), images
