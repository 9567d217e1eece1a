# hookline: `make run` starts the service on embedded defaults, `make test` runs everything CI runs.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: run test lint unit chaos fuzz bench test-mongo install clean browser

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --disable-pip-version-check -e '.[test,dev]'
	touch $(STAMP)

install: $(STAMP)

run: $(STAMP)
	$(VENV)/bin/hookline serve --demo

lint: $(STAMP)
	$(VENV)/bin/ruff check statemachine callbacks service tests bench
	$(VENV)/bin/ruff format --check statemachine callbacks service tests bench
	$(VENV)/bin/mypy

test: lint browser
	$(PY) -m pytest -q -p no:cacheprovider -n auto

# The dashboard test drives Debian's headless Chromium; install it when absent (as root, as in CI).
browser:
	@command -v chromium >/dev/null 2>&1 || { \
	  (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium) >/dev/null 2>&1 \
	  || echo "chromium could not be installed: tests/browser will skip and say why"; }

unit: $(STAMP)
	$(PY) -m pytest -q -p no:cacheprovider -m "not chaos and not browser"

chaos: $(STAMP)
	HOOKLINE_CHAOS_N=1000 $(PY) -m pytest -q -p no:cacheprovider -m chaos

fuzz: $(STAMP)
	HOOKLINE_FUZZ_EXAMPLES=2000 $(PY) -m pytest -q -p no:cacheprovider tests/fuzz

test-mongo: $(STAMP)
	@test -n "$$HOOKLINE_TEST_MONGODB_URL" || { echo "set HOOKLINE_TEST_MONGODB_URL (see deploy/docker-compose.yml)"; exit 2; }
	$(PY) -m pytest -q -p no:cacheprovider tests/contract

bench: $(STAMP)
	$(PY) -m pip install --quiet --disable-pip-version-check -e '.[test,dev,bench]'
	$(PY) -m bench.run $(BENCH_ARGS)

clean:
	rm -rf $(VENV) var
