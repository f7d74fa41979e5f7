"""Sphinx configuration of the sam_optax documentation.

``make docs`` builds it in nitpicky mode with warnings as errors
(``sphinx-build -n -W``): a broken cross-reference, a missing page or a
public name without an API entry fails the build.
"""

from __future__ import annotations

import inspect
import pathlib
import sys

ROOT = pathlib.Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import sam_optax  # noqa: E402

project = "sam_optax"
author = "The sam_optax authors"
copyright = "2026, the sam_optax authors"  # noqa: A001
release = sam_optax.__version__
version = release

extensions = [
    "myst_nb",
    "sphinx.ext.autodoc",
    "sphinx.ext.autosummary",
    "sphinx.ext.napoleon",
    "sphinx.ext.linkcode",
    "sphinx_copybutton",
    # MathJax served with the site, so that math renders without a network.
    "sphinx-mathjax-offline",
]

source_suffix = {".md": "myst-nb", ".ipynb": "myst-nb"}
root_doc = "index"
exclude_patterns = ["_build", "**/.ipynb_checkpoints"]
templates_path = ["_templates"]

# ----------------------------------------------------------------- MyST, notebooks
myst_enable_extensions = ["dollarmath", "amsmath", "colon_fence", "deflist"]
myst_heading_anchors = 3
# The notebooks are committed with their outputs; the test suite executes
# every notebook (nbmake) and checks that the stored outputs are complete.
nb_execution_mode = "off"
nb_merge_streams = True

# ----------------------------------------------------------------- API reference
autosummary_generate = True
autodoc_typehints = "signature"
autodoc_member_order = "bysource"
napoleon_google_docstring = True
napoleon_numpy_docstring = False
napoleon_use_rtype = False
add_module_names = False

# Nitpicky mode checks every reference into sam_optax; names from other
# libraries are not resolvable without their inventories (the build runs
# offline), so only those are exempt.
nitpicky = True
nitpick_ignore_regex = [
    (r"py:.*", r"(jax|jaxlib|optax|flax|numpy|np|jnp|chex|matplotlib|typing|collections|enum)(\..*)?"),
    (r"py:.*", r"(Any|Callable|Sequence|Mapping|Iterable|Literal|NamedTuple|Optional|Union|TypeVar|Protocol)"),
    (r"py:.*", r"(int|float|bool|str|tuple|list|dict|None|object|type|complex|Ellipsis|array_like|optional|callable|pytree|PyTree|Array|ArrayTree|Params|Updates|Schedule|ScalarOrSchedule|Numeric|ShapeDtypeStruct|PRNGKey|Key|Mesh|PartitionSpec|NamedSharding|Module)"),
    (r"py:.*", r"sam_optax\._.*"),
]

# ----------------------------------------------------------------- HTML
html_theme = "sphinx_book_theme"
html_title = "sam_optax"
html_theme_options = {
    "show_toc_level": 2,
    "repository_url": "https://github.com/sam-optax/sam_optax",
    "use_repository_button": True,
    "navigation_with_keys": False,
}
html_static_path = ["_static"]
html_css_files = ["custom.css"]


# ----------------------------------------------------------------- [source] links
REPOSITORY = "https://github.com/sam-optax/sam_optax/blob/main"


def linkcode_resolve(domain: str, info: dict[str, str]) -> str | None:
  """The repository file and lines that define an API entry."""
  if domain != "py" or not info.get("module"):
    return None
  # Public module paths (sam_optax.perturbations, ...) are attributes of the
  # package, not all importable modules: walk them from the package.
  obj = sam_optax
  for part in info["module"].split(".")[1:]:
    obj = getattr(obj, part, None)
  for part in info["fullname"].split("."):
    obj = getattr(obj, part, None)
  obj = inspect.unwrap(obj) if callable(obj) else obj
  try:
    path = pathlib.Path(inspect.getsourcefile(obj)).resolve()
    lines, start = inspect.getsourcelines(obj)
  except (TypeError, OSError):
    return None
  try:
    relative = path.relative_to(ROOT).as_posix()
  except ValueError:
    return None
  return f"{REPOSITORY}/{relative}#L{start}-L{start + len(lines) - 1}"
