# Two commands for a fresh machine: `make demo` and `make test`; `make docs`
# builds the documentation site into docs/_build/html.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed

.PHONY: demo test docs venv clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e ".[flax,examples,test,docs]"
	touch $(STAMP)

venv: $(STAMP)

demo: $(STAMP)
	$(PY) benchmarks/demo.py

test: $(STAMP)
	$(PY) -m pytest -n 2 -q

# Nitpicky, warnings as errors: a broken reference or a missing API entry fails.
docs: $(STAMP)
	$(VENV)/bin/sphinx-build -n -W --keep-going -b html docs docs/_build/html

clean:
	rm -rf $(VENV) results docs/_build
