# Two commands do all set-up on a fresh machine: `make demo` and `make test` (see README.md).
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.petseg-installed
PYTEST_ARGS ?=

.PHONY: demo test bench package cluster-demo lock java clean spark4-env spark4-lock

# Spark needs a JVM; say how to get one instead of failing deep inside py4j.
java:
	@command -v java >/dev/null 2>&1 || { \
	  echo "Java 17 is required by Spark (3.5 takes 8, 11 or 17; 4.0 takes 17 or 21). Install it, e.g.:"; \
	  echo "  sudo apt-get install -y openjdk-17-jre-headless   (Debian/Ubuntu)"; \
	  echo "  brew install openjdk@17                           (macOS)"; \
	  exit 1; }

$(STAMP): pyproject.toml constraints.txt
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -c constraints.txt -e '.[train,test,package]'
	@touch $@

# The Spark 4 environment, Databricks' Spark 4 line (Runtime 17.3 LTS ML, serverless environment 4):
# Python 3.12, pyspark 4.0 with Spark Connect, pyarrow 21, numpy 2, TensorFlow with tf-keras,
# spark-tensorflow-distributor, and no petastorm. The tests run the whole pipeline from it, read its
# datasets here and this environment's there, and start a local Connect server from its interpreter,
# so that the server's Python workers import the same petseg.
# python3.12 on PATH, else pyenv's latest 3.12, else $(PYTHON) with a warning.
SPARK4_VENV   ?= .venv-spark4
SPARK4_PY     := $(SPARK4_VENV)/bin/python
SPARK4_STAMP  := $(SPARK4_VENV)/.petseg-installed
SPARK4_PYTHON ?= $(or $(shell python3.12 -c 'import sys; print(sys.executable)' 2>/dev/null),$(shell \
  v=$$(pyenv latest 3.12 2>/dev/null) && PYENV_VERSION=$$v pyenv which python3.12 2>/dev/null))
$(SPARK4_STAMP): pyproject.toml constraints-spark4.txt
	@test -n "$(SPARK4_PYTHON)" || echo "warning: no Python 3.12 found (python3.12, pyenv); building $(SPARK4_VENV) on $(PYTHON)"
	@want=$$($(or $(SPARK4_PYTHON),$(PYTHON)) -c 'import sys; print(sys.version_info[:2])'); \
	  have=$$($(SPARK4_PY) -c 'import sys; print(sys.version_info[:2])' 2>/dev/null); \
	  test "$$have" = "$$want" || { rm -rf $(SPARK4_VENV); $(or $(SPARK4_PYTHON),$(PYTHON)) -m venv $(SPARK4_VENV); }
	$(SPARK4_PY) -m pip install --quiet --upgrade pip
	$(SPARK4_PY) -m pip install --quiet -c constraints-spark4.txt -e '.[train,infer,test]'
	@touch $@

spark4-env: $(SPARK4_STAMP)

# The whole pipeline on local Spark with the embedded default (conf/local.yaml): ingest -> train -> infer -> evaluate.
demo: java $(STAMP)
	$(VENV)/bin/petseg demo

# pytest exits 5 when it collects nothing; that is a failure here, with a message.
test: java $(STAMP) $(SPARK4_STAMP)
	@$(PY) -m pytest $(PYTEST_ARGS); rc=$$?; \
	if [ $$rc -eq 5 ]; then echo "pytest collected no tests: check tests/ and PYTEST_ARGS"; fi; exit $$rc

# The benchmarks' peers (Ray Data, the `bench` extra), installed only here: `make test` never pulls them.
BENCH_STAMP := $(VENV)/.petseg-bench-installed
$(BENCH_STAMP): $(STAMP)
	$(PY) -m pip install --quiet -c constraints.txt -e '.[train,bench]'
	@touch $@

bench: java $(BENCH_STAMP)
	$(PY) bench/ingest.py
	$(PY) bench/train.py
	$(PY) bench/infer.py

# For clusters whose nodes lack the libraries: the petseg wheel, and a relocatable environment
# (venv-pack) with petseg and every pinned dependency, for
#   spark-submit --archives $(DIST)/petseg-env.tar.gz#env --conf spark.pyspark.python=./env/bin/python ...
# The nodes need the same Python (3.11) at the same path as this machine: venv-pack links to it.
DIST     ?= dist
PACK_ENV ?= build/pack-env
package: $(STAMP)
	rm -rf $(DIST) $(PACK_ENV)
	$(PY) -m build --wheel --outdir $(DIST) .
	"$$($(PY) -c 'import sys; print(sys._base_executable)')" -m venv $(PACK_ENV)
	$(PACK_ENV)/bin/python -m pip install --quiet -c constraints.txt "$$(ls $(DIST)/petseg-*.whl)[train]"
	$(VENV)/bin/venv-pack --prefix $(PACK_ENV) --output $(DIST)/petseg-env.tar.gz --compress-level 1 --force --quiet

# Re-pin constraints.txt after changing dependencies. Each lock installs into a fresh environment
# exactly what its test environment installs, the old pins kept where they still fit, and freezes
# that: never what was added to .venv by hand or by `make bench` (Ray).
LOCK_ENV ?= build/lock-env
lock:
	rm -rf $(LOCK_ENV) && $(PYTHON) -m venv $(LOCK_ENV)
	$(LOCK_ENV)/bin/python -m pip install --quiet --upgrade pip
	$(LOCK_ENV)/bin/python -m pip install --quiet -c constraints.txt -e '.[train,test,package]'
	{ echo "# The exact package set petseg is tested with (Python 3.11). The Makefile installs with -c this file."; \
	  echo "# Regenerate after changing pyproject.toml: make lock"; \
	  $(LOCK_ENV)/bin/python -m pip freeze --exclude-editable | grep -v '^petseg'; } > constraints.txt
	rm -rf $(LOCK_ENV)

spark4-lock:
	@test -n "$(SPARK4_PYTHON)" || { echo "make spark4-lock needs Python 3.12 (python3.12 or pyenv)"; exit 1; }
	rm -rf $(LOCK_ENV) && $(SPARK4_PYTHON) -m venv $(LOCK_ENV)
	$(LOCK_ENV)/bin/python -m pip install --quiet --upgrade pip
	$(LOCK_ENV)/bin/python -m pip install --quiet -c constraints-spark4.txt -e '.[train,infer,test]'
	{ echo "# The Spark 4 environment petseg is tested with (Python $$($(LOCK_ENV)/bin/python -c 'import platform; print(platform.python_version())')): make spark4-env."; \
	  echo "# Regenerate after changing pyproject.toml: make spark4-lock"; \
	  $(LOCK_ENV)/bin/python -m pip freeze --exclude-editable | grep -v '^petseg'; } > constraints-spark4.txt
	rm -rf $(LOCK_ENV)

clean:
	rm -rf build .pytest_cache
