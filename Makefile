# Two commands on a fresh machine: `make demo` and `make test`. Everything is installed into .venv by pip
# from pyproject.toml (the server extra and the dev tools: a plain `pip install gateway` is the SDK alone);
# generated certificates, models and audit logs live in ignored folders.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
GATEWAY := $(VENV)/bin/gateway
STAMP := $(VENV)/.installed
NODE_DIRS := tests/interop/node tests/interop/oidc
NODE_STAMPS := $(addsuffix /node_modules/.package-lock.json,$(NODE_DIRS))

.PHONY: setup node-deps demo test serve lint proto certs models bench clean

setup: $(STAMP) node-deps

# The Node packages of the interoperability tests, each folder from its committed lock file: the stock Node gRPC
# client (tests/interop/node) and node-oidc-provider, the OpenID provider of the identity-provider tests
# (tests/interop/oidc). Skipped, with a message, where npm is absent; the tests that need them then skip too.
node-deps:
	@if command -v npm >/dev/null; then $(MAKE) -s --no-print-directory $(NODE_STAMPS); \
	else echo "npm not found: skipping $(NODE_DIRS) (their interoperability tests will be skipped)"; fi

%/node_modules/.package-lock.json: %/package.json %/package-lock.json
	npm ci --ignore-scripts --no-audit --no-fund --loglevel=error --prefix $*

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
	rm -rf $(VENV) $(addsuffix /node_modules,$(NODE_DIRS)) models var
