# Two commands do all set-up on a fresh machine: `make demo` and `make test` (see README.md).
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.petseg-installed
PYTEST_ARGS ?=

.PHONY: demo test bench lock java clean

# Spark needs a JVM; say how to get one instead of failing deep inside py4j.
java:
	@command -v java >/dev/null 2>&1 || { \
	  echo "Java is required by Spark 3.5 (Java 8, 11 or 17). Install it, e.g.:"; \
	  echo "  sudo apt-get install -y openjdk-17-jre-headless   (Debian/Ubuntu)"; \
	  echo "  brew install openjdk@17                           (macOS)"; \
	  exit 1; }

$(STAMP): pyproject.toml constraints.txt
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -c constraints.txt -e '.[test]'
	@touch $@

# Ingest synthetic pets on local Spark with the embedded default (conf/local.yaml).
demo: java $(STAMP)
	$(VENV)/bin/petseg demo

# pytest exits 5 when it collects nothing; that is a failure here, with a message.
test: java $(STAMP)
	@$(PY) -m pytest $(PYTEST_ARGS); rc=$$?; \
	if [ $$rc -eq 5 ]; then echo "pytest collected no tests: check tests/ and PYTEST_ARGS"; fi; exit $$rc

bench: java $(STAMP)
	$(PY) bench/ingest.py
	$(PY) bench/train.py
	$(PY) bench/infer.py

# Re-pin constraints.txt from the current environment after changing dependencies.
lock: $(STAMP)
	{ echo "# The exact package set petseg is tested with (Python 3.11). The Makefile installs with -c this file."; \
	  echo "# Regenerate after changing pyproject.toml: make lock"; \
	  $(PY) -m pip freeze --exclude-editable | grep -v '^petseg'; } > constraints.txt

clean:
	rm -rf build .pytest_cache
