# Two commands do all the set-up on a fresh clone: `make run` (the main job) and `make test`.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
DATA ?= ../shared/data/banking77
OUT ?= runs/quickstart

.PHONY: run test browser clean

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	# The CPU build of torch first: left to the resolver, torch pulls a multi-GB CUDA build.
	$(BIN)/pip install -q "torch==2.13.0"
	$(BIN)/pip install -q -e ".[test]"
	touch $@

# A short federation of the default model (all-MiniLM-L6-v2, shipped in a package) on BANKING77.
run: $(VENV)/.installed
	$(BIN)/fedlora simulate --data $(DATA) --num-clients 10 --rounds 3 \
		--partition dirichlet --alpha 0.5 --out $(OUT) \
		--run-config "label-column=category max-train-examples=3000 max-eval-examples=1000"

# Headless Chromium (Debian's package), for the test that renders `fedlora report`'s page.
browser:
	@command -v chromium-headless-shell >/dev/null || command -v chromium >/dev/null || \
	  { [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null && \
	    apt-get update -qq >/dev/null && DEBIAN_FRONTEND=noninteractive \
	    apt-get install -y -qq --no-install-recommends chromium-headless-shell >/dev/null; } || \
	  echo "no headless Chromium (install chromium-headless-shell): the report's browser check skips"

test: $(VENV)/.installed browser
	FEDLORA_BANKING77=$(abspath $(DATA)) $(BIN)/python -m pytest -q --durations=15

clean:
	rm -rf $(VENV) runs .pytest_cache
