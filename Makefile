# One task runner; `make check` is exactly what CI runs after starting the services.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
# The lock, requirements/*.txt: exact versions with hashes, generated from pyproject.toml by
# `make lock` (Python 3.11, Linux x86_64). runtime.txt is what the image installs; dev.txt is
# runtime.txt plus the dev extra, bench.txt is dev.txt plus the bench extra (each compiled with
# the one before it as constraints, so a package has the same version in all three).

.PHONY: install run test unit connected chaos lint format typecheck check docs bench clean lock web

# Installs exactly the lock, hash-checked, then the project itself without dependencies; `pip check`
# fails when pyproject.toml asks for something the lock does not hold (run `make lock`).
$(STAMP): pyproject.toml requirements/runtime.txt requirements/dev.txt
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet --require-hashes -r requirements/dev.txt
	$(BIN)/python -m pip install --quiet --no-deps -e .
	$(BIN)/python -m pip check
	touch $(STAMP)

install: $(STAMP) web ## create .venv and install the locked dependencies, the dev tools, the project and web/

# web/: the AsyncAPI page's script and stylesheet (@asyncapi/react-component, served by the worker itself)
# and the official AsyncAPI parser the tests check the document with, exactly web/package-lock.json.
# npm ci writes node_modules/.package-lock.json last: missing or older than the lock, it runs again.
WEB_STAMP := web/node_modules/.package-lock.json
$(WEB_STAMP): web/package.json web/package-lock.json
	npm ci --prefix web
	touch $(WEB_STAMP)

web: $(WEB_STAMP) ## install web/node_modules from web/package-lock.json (npm ci) when missing or stale

# uv resolves; pip installs (nothing but pip is needed to install from the lock). uv lives in its own
# venv under .venv, pinned, so the lock files come out the same on every machine.
UV_VERSION := 0.13.9
UV := $(VENV)/.lock-tools/bin/uv
UV_COMPILE = $(UV) pip compile --quiet --python-version 3.11 --python-platform x86_64-unknown-linux-gnu \
	--generate-hashes --no-strip-markers --custom-compile-command 'make lock' $(LOCK_FLAGS) pyproject.toml

$(UV):
	$(PY) -m venv $(VENV)/.lock-tools
	$(VENV)/.lock-tools/bin/python -m pip install --quiet uv==$(UV_VERSION)

lock: $(UV) ## regenerate requirements/*.txt from pyproject.toml, keeping pins still allowed (LOCK_FLAGS=--upgrade: newest allowed)
	mkdir -p requirements
	$(UV_COMPILE) -o requirements/runtime.txt
	$(UV_COMPILE) --extra dev -c requirements/runtime.txt -o requirements/dev.txt
	$(UV_COMPILE) --extra dev --extra bench -c requirements/dev.txt -o requirements/bench.txt

run: $(STAMP) $(WEB_STAMP) ## run the worker with HTTP on :8000 (health, metrics, AsyncAPI docs)
	$(BIN)/faststream run streams.app:app --host 0.0.0.0 --port 8000

test: check ## the whole suite: lint, types, unit and connected tests

unit: $(STAMP) $(WEB_STAMP) ## in-memory tests only (fast)
	$(BIN)/pytest -m "not connected and not chaos"

connected: $(STAMP) $(WEB_STAMP) ## tests against the real RabbitMQ, Redis and PostgreSQL
	$(BIN)/pytest -m connected

chaos: $(STAMP) ## fault injection on private servers (slow): CHAOS_SEED (default random, printed), CHAOS_N (default 20000)
	$(BIN)/pytest -m chaos -s -p no:cacheprovider tests/chaos

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

format: $(STAMP)
	$(BIN)/ruff format .
	$(BIN)/ruff check --fix .

typecheck: $(STAMP)
	$(BIN)/mypy

check: lint typecheck $(WEB_STAMP) docs-site ## ruff + mypy --strict + the docs site + pytest (what CI runs)
	$(BIN)/pytest -m "not chaos"

docs: $(STAMP) ## regenerate asyncapi.yaml and docs/configuration.md from the code, then build the site
	# FastStream lists channels, operations, messages and schemas in an order that moves from run to
	# run (the same content): sorted by name here, so the file changes only when the content does.
	$(BIN)/faststream docs gen --yaml streams.app:app --out asyncapi.yaml
	$(BIN)/python -c 'import yaml; d = yaml.safe_load(open("asyncapi.yaml")); \
		d.update({k: dict(sorted(d[k].items())) for k in ("channels", "operations")}); \
		d["components"] = {k: dict(sorted(v.items())) for k, v in d["components"].items()}; \
		open("asyncapi.yaml", "w").write(yaml.dump(d, sort_keys=False))'
	$(BIN)/python -m tools.gen_config
	$(MAKE) --no-print-directory docs-site

.PHONY: docs-site
docs-site: $(STAMP) ## build the documentation site into site/ (mkdocs build --strict; examples: docs_src/)
	NO_MKDOCS_2_WARNING=1 $(BIN)/mkdocs build --strict --quiet

clean:
	rm -rf $(VENV) .mypy_cache .ruff_cache .pytest_cache *.egg-info pipeline.db* web/node_modules

.PHONY: bench-scale bench-profile
BENCH_STAMP := $(VENV)/.bench-installed
$(BENCH_STAMP): pyproject.toml requirements/bench.txt $(STAMP)
	$(BIN)/python -m pip install --quiet --require-hashes -r requirements/bench.txt
	$(BIN)/python -m pip check
	touch $(BENCH_STAMP)

bench: $(BENCH_STAMP) ## benchmark table -> bench/results/ (BENCH_N=20000 BENCH_ROUNDS=3 BENCH_ONLY=...; see bench/README.md)
	$(BIN)/python -m bench run

bench-scale: $(BENCH_STAMP) ## scaling figures: 1-3 workers, 1M-event store append rate, projection rebuild
	$(BIN)/python -m bench scale

bench-profile: $(BENCH_STAMP) ## py-spy flame graphs of the worker draining RabbitMQ and Redis
	$(BIN)/python -m bench profile

.PHONY: soak
soak: $(STAMP) ## one worker under a steady mixed load on both brokers (SOAK_RATE=800 msg/s, SOAK_SECONDS=3600): RSS and outcomes -> bench/results/soak-latest.*
	$(BIN)/python -m bench.soak

.PHONY: bench-io
bench-io: $(BENCH_STAMP) ## the I/O-bound workload against local providers (mail API 100 ms, limits, LLM) -> bench/results/io-latest.* (BENCH_IO_QUICK=1: a smoke run)
	$(BIN)/python -m bench.io
