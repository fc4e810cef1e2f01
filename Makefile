# Two commands on a fresh machine: `make demo` and `make test`. Everything is installed into .venv by pip
# from pyproject.toml (the server extra and the dev tools: a plain `pip install gateway` is the SDK alone);
# generated certificates, models and audit logs live in ignored folders.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
GATEWAY := $(VENV)/bin/gateway
STAMP := $(VENV)/.installed
NODE_DIR := tests/interop/node
NODE_STAMP := $(NODE_DIR)/node_modules/.package-lock.json

.PHONY: setup node-deps demo test serve lint proto certs models bench clean

setup: $(STAMP) node-deps

# The stock Node gRPC client used by the interoperability tests, from the committed lock file (skipped, with a
# message, where npm is absent; the tests that need it then skip too).
node-deps:
	@if command -v npm >/dev/null; then $(MAKE) -s --no-print-directory $(NODE_STAMP); \
	else echo "npm not found: skipping $(NODE_DIR) (its interoperability test will be skipped)"; fi

$(NODE_STAMP): $(NODE_DIR)/package.json $(NODE_DIR)/package-lock.json
	npm ci --ignore-scripts --no-audit --no-fund --loglevel=error --prefix $(NODE_DIR)

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	@# setuptools >= 80 prints a boxed "Editable installation" notice on every editable build: noise, not news.
	PYTHONWARNINGS="ignore:Editable installation" $(PY) -m pip install --quiet -e ".[server,otel,dev]"
	touch $(STAMP)

certs: certs/signing/ca.crt
certs/signing/ca.crt: scripts/gen_certs.sh | $(STAMP)
	scripts/gen_certs.sh --force certs alice bob mallory

models: models/mlp/2/model.onnx
models/mlp/2/model.onnx: scripts/make_demo_models.py | $(STAMP)
	$(PY) scripts/make_demo_models.py --force models

demo: setup certs models
	$(PY) scripts/demo.py

test: setup certs models
	$(PY) -m pytest -q

serve: setup certs models
	$(GATEWAY) serve --certs certs/server --models models --policies policies --audit-log var/audit/audit.log

lint: setup
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/mypy gateway

proto: setup
	scripts/gen_proto.sh

bench: setup certs models
	$(PY) -m bench

clean:
	find certs -mindepth 1 -maxdepth 1 ! -name README.md -exec rm -rf {} +
	rm -rf $(VENV) $(NODE_DIR)/node_modules models var
