# smaso: one entry point for set-up, the book and the tests.
#   make book    set up .venv (if needed), then build the HTML book into _build/html, executing the chapters
#   make test    set up .venv (if needed), build the book, then run every test: unit tests, book checks,
#                nbval strict, the built book in headless Chromium (tests/test_browser.py), and a chapter
#                run and edited in JupyterLab in that browser (tests/test_jupyter.py)
#   make notebook NB=book/NAME.md   re-execute one edited chapter into its paired book/NAME.ipynb
#   make lab     set up .venv (if needed), then JupyterLab on the book: book/NAME.md opens as a notebook,
#                and saving it writes both NAME.md and NAME.ipynb (LAB_ARGS="--port=9999 --no-browser" etc.)
#   make unit    the package's unit tests alone (no book, no nbval, no browser): the fast loop
#   make lint    ruff: lint and format check of every Python file (make test runs it)
#   make test-oldest  the unit tests and four chapters at the oldest versions pyproject.toml declares
#                (a separate .venv-oldest; downloads about 2.5 GB; README: "Supported versions")
# PYTHON picks the interpreter that creates the virtual environment; VENV where it lives.
SHELL := /bin/bash
.SHELLFLAGS := -eu -o pipefail -c
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.smaso-installed
CONSTRAINTS := requirements/constraints.txt
export PATH := $(abspath $(BIN)):$(PATH)
export PYTHONHASHSEED := 0

.PHONY: env book test test-oldest unit lint notebook notebooks lab lock clean

env: $(STAMP)

# The pinned set: torch/torchvision first (their pins are the ones this workplace serves from disk),
# then the package with its [book,test] extras, everything constrained to requirements/constraints.txt.
$(STAMP): pyproject.toml $(CONSTRAINTS)
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --disable-pip-version-check -c $(CONSTRAINTS) torch==2.14.1 torchvision==0.29.1
	$(BIN)/python -m pip install --quiet --disable-pip-version-check -c $(CONSTRAINTS) -e '.[book,test]'
	touch $@

# With SMASO_TABLE2_RESULTS set (full-scale Table 2 results for the Experiments chapter) the
# execution cache goes first: it knows the chapters' code, not the environment.
book: $(STAMP)
	$(if $(SMASO_TABLE2_RESULTS),rm -rf _build/.jupyter_cache)
	$(BIN)/jupyter-book build . --warningiserror --keep-going
	@echo "Book: $(CURDIR)/_build/html/index.html"

# The browser test (tests/test_browser.py) checks _build/html, so the book is built (or brought up to date) first.
# Then nbval once more, under another numeric environment: PyTorch's unvectorised kernels and one
# thread (another CPU's rounding, on this one). The chapters' stored outputs must hold there too.
OTHER_NUMERICS := ATEN_CPU_CAPABILITY=default OMP_NUM_THREADS=1 MKL_NUM_THREADS=1
# The second pass runs one thread per chapter, so it spreads the chapters over the machine's
# cores (pytest-xdist, at most 4 workers); --dist loadfile keeps each chapter's cells in one
# worker and one kernel, in order. (The first pass keeps PyTorch's default threads.)
WORKERS := $(shell n=$$(nproc 2>/dev/null || echo 2); echo $$(( n < 4 ? n : 4 )))
XDIST := -n $(WORKERS) --dist loadfile
test: lint book
	$(BIN)/python -m pytest
	$(OTHER_NUMERICS) $(BIN)/python -m pytest book $(XDIST) -p no:cacheprovider

UNIT := -m pytest tests -q -n $(WORKERS) --dist worksteal --ignore=tests/test_browser.py --ignore=tests/test_jupyter.py --ignore=tests/test_book.py
unit: $(STAMP)
	$(BIN)/python $(UNIT)

# The oldest versions the package declares (README: "Supported versions"): a virtual environment of
# its own, the runtime dependencies of pyproject.toml at their lower bounds (uv's lowest-direct
# resolution: torch, torchvision, numpy, ...), the [book,test] extras at the newest versions that
# go with them; then `make unit`'s tests and nbval of the four theory chapters that run in under
# a minute, with caches of compiled kernels of their own. Downloads about 2.5 GB (a CUDA build of
# the oldest torch): not part of `make test`. Run it when a dependency or its bound changes.
OLDEST ?= .venv-oldest
OLDEST_CHAPTERS := book/intro.ipynb book/maso.ipynb book/gmm.ipynb book/factorial.ipynb
test-oldest:
	rm -rf $(OLDEST)
	$(PYTHON) -m venv $(OLDEST)
	$(OLDEST)/bin/python -m pip install --quiet --disable-pip-version-check uv
	$(OLDEST)/bin/uv pip install --quiet --python $(OLDEST)/bin/python --resolution lowest-direct -r pyproject.toml
	$(OLDEST)/bin/uv pip freeze --python $(OLDEST)/bin/python | grep -v '^uv==' > $(OLDEST)/lowest.txt
	$(OLDEST)/bin/uv pip install --quiet --python $(OLDEST)/bin/python -c $(OLDEST)/lowest.txt -e '.[book,test]'
	$(OLDEST)/bin/python -c "import torch, torchvision, numpy; print('oldest:', torch.__version__, torchvision.__version__, numpy.__version__)"
	cd $(CURDIR) && export PATH="$(abspath $(OLDEST))/bin:$$PATH" \
	  TORCH_EXTENSIONS_DIR="$(abspath $(OLDEST))/torch_extensions" \
	  TORCHINDUCTOR_CACHE_DIR="$(abspath $(OLDEST))/inductor" && \
	  $(OLDEST)/bin/python $(UNIT) && \
	  $(OLDEST)/bin/python -m pytest -q -p no:cacheprovider $(OLDEST_CHAPTERS)

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

# Re-execute an edited chapter into its paired notebook (jupytext pairing: book/jupytext.toml).
notebook: $(STAMP)
	@test -n "$(NB)" || { echo "usage: make notebook NB=book/NAME.md" >&2; exit 2; }
	cd $(dir $(NB)) && $(abspath $(BIN))/jupytext --to ipynb --execute $(notdir $(NB))

notebooks: $(STAMP)
	for md in $$(grep -l '^  format_name: myst' book/*.md); do $(MAKE) --no-print-directory notebook NB=$$md; done

# JupyterLab on the book, as a reader runs the chapters (README: "Running a chapter in Jupyter").
# jupytext's server extension (installed with jupytext) reads and writes book/NAME.md as a notebook,
# paired with book/NAME.ipynb (book/jupytext.toml); the settings in .jupyter/ make a double-click on
# a chapter's .md open it as a notebook. A kernel runs in the chapter's folder, as in the book build.
# tests/test_jupyter.py checks all this in a browser. As root, add LAB_ARGS=--allow-root.
LAB_ARGS ?=
lab: $(STAMP)
	JUPYTER_CONFIG_PATH="$(CURDIR)/.jupyter$${JUPYTER_CONFIG_PATH:+:$$JUPYTER_CONFIG_PATH}" \
	  $(BIN)/jupyter lab --ServerApp.root_dir="$(CURDIR)" --LabApp.default_url=/lab/tree/book $(LAB_ARGS)

# Regenerate the pins from the current environment (after changing dependencies in pyproject.toml).
lock: $(STAMP)
	{ sed -n '1,2p' $(CONSTRAINTS); $(BIN)/python -m pip freeze --exclude-editable | grep -v '^smaso'; } > $(CONSTRAINTS).new
	mv $(CONSTRAINTS).new $(CONSTRAINTS)

clean:
	rm -rf _build
