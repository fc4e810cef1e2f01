# Two commands on a fresh machine: `make demo` and `make test`. Every Python package comes from uv.lock,
# hash-checked, installed into .venv by uv (itself installed from requirements/uv.txt, hash-checked, by pip):
# a fresh machine installs exactly what was tested. `make test-latest` tests the newest releases pyproject's
# ranges allow instead. Generated certificates, models and audit logs live in ignored folders.
PYTHON ?= python3
# The newest Python on the machine, for test-latest (the locked suite runs on $(PYTHON), the oldest supported).
PYTHON_LATEST ?= $(shell scripts/newest_python.sh $(PYTHON))
VENV := .venv
LATEST_VENV := .venv-latest
PY := $(VENV)/bin/python
GATEWAY := $(VENV)/bin/gateway
UV_HOME := .tools/uv
UV := $(UV_HOME)/bin/uv
STAMP := $(VENV)/.installed
DEMO_STAMP := $(VENV)/.demo-installed
NODE_DIRS := tests/interop/node tests/interop/oidc
NODE_STAMPS := $(addsuffix /node_modules/.package-lock.json,$(NODE_DIRS))
PERF_ANALYZER := .tools/perf-analyzer
# uv uses the machine's Python (never downloads one) and keeps the project's environment in .venv.
export UV_PYTHON := $(PYTHON)
export UV_PYTHON_DOWNLOADS := never
export UV_PROJECT_ENVIRONMENT := $(VENV)
export UV_NO_PROGRESS := 1
# Server, tracing and every tool of the tests; the demo needs the server and the demo group alone.
FULL_ENV := --extra server --extra signing --extra otel --group dev
DEMO_ENV := --no-default-groups --extra server --extra signing --group demo

.PHONY: setup node-deps side-venvs perf-analyzer promtool demo test test-latest test-cryptography serve lint proto certs models bench lock sbom audit-deps clean

setup: $(STAMP) node-deps side-venvs perf-analyzer promtool

$(UV): requirements/uv.txt
	$(PYTHON) -m pip install --quiet --disable-pip-version-check --root-user-action=ignore --no-deps \
		--require-hashes --upgrade --target $(UV_HOME) -r requirements/uv.txt
	touch $(UV)

# --locked: the lock must match pyproject.toml (else: make lock); exact: whatever the lock lacks is removed.
$(STAMP): uv.lock pyproject.toml | $(UV)
	$(UV) sync --quiet --locked $(FULL_ENV)
	touch $(STAMP)

# The demo's lean environment: no test tools, linters, plotting or Node. --inexact keeps a full .venv whole.
$(DEMO_STAMP): uv.lock pyproject.toml | $(UV)
	$(UV) sync --quiet --locked --inexact $(DEMO_ENV)
	touch $(DEMO_STAMP)

# The Node packages of the interoperability tests, each folder from its committed lock file: the stock Node gRPC
# client (tests/interop/node) and node-oidc-provider, the OpenID provider of the identity-provider tests
# (tests/interop/oidc). Skipped, with a message, where npm is absent; the tests that need them then skip too.
node-deps:
	@if command -v npm >/dev/null; then $(MAKE) -s --no-print-directory $(NODE_STAMPS); \
	else echo "npm not found: skipping $(NODE_DIRS) (their interoperability tests will be skipped)"; fi

%/node_modules/.package-lock.json: %/package.json %/package-lock.json
	npm ci --ignore-scripts --no-audit --no-fund --loglevel=error --prefix $*

# Prometheus' promtool (Debian's package, pinned by version and sha256) for the tests that check the metrics
# exposition and the alert rules of deploy/prometheus/; skipped, with a message, where it cannot be had.
promtool:
	@scripts/get_promtool.sh .tools/prometheus

# Triton's perf_analyzer binary (pinned, hash-checked), for the stock-client tests; where it cannot run, the
# script leaves a note saying why and those tests skip with it.
perf-analyzer: $(PERF_ANALYZER)/.installed
$(PERF_ANALYZER)/.installed: scripts/install_perf_analyzer.sh scripts/fetch_deb.sh requirements/perf-analyzer.txt
	PYTHON=$(PYTHON) scripts/install_perf_analyzer.sh $(PERF_ANALYZER)
	[ -f $(PERF_ANALYZER)/unavailable ] || touch $@  # not installed: the next make tries again

# The real third-party servers the backend tests run as subprocesses (MLServer, KServe's ModelServer), each in its
# own venv from its hash-pinned requirements/NAME.txt (compiled by `make lock` from NAME.in): never in .venv.
SIDE_VENVS := mlserver kserve
side-venvs: $(foreach name,$(SIDE_VENVS),.venv-$(name)/.installed)

.venv-%/.installed: requirements/%.txt | $(UV)
	rm -rf .venv-$*
	$(UV) venv --quiet .venv-$*
	VIRTUAL_ENV=.venv-$* $(UV) pip install --quiet --require-hashes --no-deps -r requirements/$*.txt
	touch $@

certs: certs/signing/ca.crt
certs/signing/ca.crt: scripts/gen_certs.sh | $(DEMO_STAMP)
	scripts/gen_certs.sh --force certs alice bob mallory

models: models/mlp/2/model.onnx
models/mlp/2/model.onnx: scripts/make_demo_models.py | $(DEMO_STAMP)
	$(PY) scripts/make_demo_models.py --force models

demo: $(DEMO_STAMP) certs models
	$(PY) scripts/demo.py

test: setup certs models
	$(PY) -m pytest -q

# The whole suite in a separate venv resolved from pyproject's ranges alone (no lock), on the newest Python here:
# a breaking upstream release is found by this job, not by users.
test-latest: node-deps certs models | $(UV)
	rm -rf $(LATEST_VENV)
	$(UV) venv --quiet --python $(PYTHON_LATEST) $(LATEST_VENV)
	VIRTUAL_ENV=$(LATEST_VENV) $(UV) pip install --quiet --refresh --upgrade -e ".[server,signing,otel]" --group dev
	$(LATEST_VENV)/bin/python -m pip list --format=freeze > $(LATEST_VENV)/resolved.txt
	@echo "test-latest: $$($(LATEST_VENV)/bin/python --version); versions in $(LATEST_VENV)/resolved.txt"
	$(LATEST_VENV)/bin/python -m pytest -q

# The certificate code on both ends of cryptography's range (pyproject's floor, and the newest 51.x, which
# pyOpenSSL, pulled in by model-signing, still excludes from the lock): a throwaway venv per version, the lock for
# everything else, then the tests of peer certificates, identities and CRLs.
CRYPTOGRAPHY_EDGES ?= 44.0.0 51.0.1
CERT_TESTS := tests/unit/test_peer_certificates.py tests/e2e/test_cert_identity.py tests/e2e/test_intermediate_ca.py
test-cryptography: certs models | $(UV)
	@mkdir -p var
	$(UV) export --quiet --locked --format requirements.txt --no-hashes --no-emit-project $(FULL_ENV) \
		-o var/locked-requirements.txt
	for version in $(CRYPTOGRAPHY_EDGES); do \
		rm -rf var/venv-cryptography && $(UV) venv --quiet var/venv-cryptography && \
		echo "cryptography==$$version" > var/cryptography-override.txt && \
		VIRTUAL_ENV=var/venv-cryptography $(UV) pip install --quiet -r var/locked-requirements.txt -e . \
			--override var/cryptography-override.txt && \
		var/venv-cryptography/bin/python -c "import cryptography; print('cryptography', cryptography.__version__)" && \
		var/venv-cryptography/bin/python -m pytest -q -p no:cacheprovider $(CERT_TESTS) || exit 1; \
	done

serve: $(DEMO_STAMP) certs models
	$(GATEWAY) serve --certs certs/server --models models --policies policies --audit-log var/audit/audit.log \
		--http-listen 127.0.0.1:8443

# Re-resolve uv.lock to the newest releases pyproject allows (LOCK_FLAGS= keeps the pins that still fit), and
# the hash-checked requirement files made from it: the image's server set (with tracing: server-otel) and the
# SBOM tool's.
LOCK_FLAGS ?= --upgrade
lock: | $(UV)
	$(UV) lock $(LOCK_FLAGS)
	$(UV) export --quiet --locked --format requirements.txt --no-emit-project --no-default-groups --extra server \
		--extra signing -o requirements/server.txt
	$(UV) export --quiet --locked --format requirements.txt --no-emit-project --no-default-groups --extra server \
		--extra signing --extra otel -o requirements/server-otel.txt
	$(UV) export --quiet --locked --format requirements.txt --no-emit-project --only-group sbom \
		-o requirements/sbom.txt
	for name in $(SIDE_VENVS); do \
		$(UV) pip compile --quiet $(LOCK_FLAGS) --universal --python-version 3.11 --generate-hashes \
			requirements/$$name.in -o requirements/$$name.txt || exit 1; \
	done

# A CycloneDX SBOM of the locked server environment, made as the image makes its own: the server's hash-checked
# requirements and the project's wheel installed into a scratch venv, then cyclonedx-py reads what is installed.
sbom: setup
	rm -rf var/sbom-env && mkdir -p var
	$(UV) venv --quiet var/sbom-env
	VIRTUAL_ENV=var/sbom-env $(UV) pip install --quiet --require-hashes --no-deps -r requirements/server.txt
	VIRTUAL_ENV=var/sbom-env $(UV) pip install --quiet --no-deps .
	$(VENV)/bin/cyclonedx-py environment --pyproject pyproject.toml --output-reproducible \
		--output-file var/sbom.cdx.json var/sbom-env/bin/python
	@echo "wrote var/sbom.cdx.json"

# Known vulnerabilities in every locked version (PyPI's advisory data); one line and success where none answers.
audit-deps: setup
	@mkdir -p var
	@$(UV) export --quiet --locked --format requirements.txt --no-emit-project --all-extras --all-groups \
		-o var/all-requirements.txt
	@$(PY) scripts/audit_deps.py var/all-requirements.txt

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
	rm -rf $(VENV) $(LATEST_VENV) $(addprefix .venv-,$(SIDE_VENVS)) .tools $(addsuffix /node_modules,$(NODE_DIRS)) models var
