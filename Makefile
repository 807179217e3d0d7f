# The two commands of the README:
#   make demo   start a local downstream sink and the gateway on the embedded
#               defaults, send sample messages, show the verdicts; Ctrl-C stops
#   make test   set up (apt packages, .venv) then ruff, mypy and pytest
# Both are safe to re-run: every set-up step only acts when something is missing.

SHELL := /bin/bash
.SHELLFLAGS := -euo pipefail -c
.DEFAULT_GOAL := help

PYTHON ?= python3
VENV := .venv
VPY := $(VENV)/bin/python
# Re-install only when the dependencies changed (pyproject.toml is newer).
STAMP := $(VENV)/.installed-dev
PYTEST_ARGS ?=
DEMO_ARGS ?=  # make demo DEMO_ARGS=--milter: also show milter mode

.PHONY: help test demo setup system-deps venv lint typecheck pytest configs screenshots clean

help:
	@echo "make demo   run the gateway with a local downstream and sample mail (Ctrl-C stops)"
	@echo "make test   install test dependencies if missing, then ruff, mypy, pytest"
	@echo "make configs  re-render the compose/Kubernetes configs from config.example.toml"
	@echo "make screenshots  retake docs/img/web-*.png (the browser test, headless chromium)"

setup: system-deps venv

system-deps:
	@bash .ci/system-deps

venv: $(STAMP)

$(STAMP): pyproject.toml
	@test -x $(VPY) || $(PYTHON) -m venv $(VENV)
	$(VPY) -m pip install -q --disable-pip-version-check -e '.[dev]'
	@touch $@

lint: venv
	@rc=0; \
	echo "ruff check ."; $(VENV)/bin/ruff check . || rc=1; \
	echo "ruff format --check ."; $(VENV)/bin/ruff format --check . || rc=1; \
	exit $$rc

typecheck: venv
	$(VENV)/bin/mypy

# pytest exits 5 when it collected nothing: that is a failure here, never a pass.
pytest: venv
	@rc=0; $(VPY) -m pytest -q -p no:cacheprovider $(PYTEST_ARGS) || rc=$$?; \
	if [ $$rc -eq 5 ]; then echo "pytest collected no tests: failing" >&2; fi; \
	exit $$rc

# Every check runs even when an earlier one failed, so one run shows everything
# to fix; the target fails if any did.
test: setup
	@status=0; \
	$(MAKE) --no-print-directory lint || status=1; \
	$(MAKE) --no-print-directory typecheck || status=1; \
	$(MAKE) --no-print-directory pytest || status=1; \
	if [ $$status -ne 0 ]; then echo "make test: FAILED (see above)" >&2; fi; \
	exit $$status

demo: venv
	$(VPY) deploy/demo/run.py $(DEMO_ARGS)

# Re-render the compose and Kubernetes configs (single node and cluster) after
# an edit of config.example.toml (tests/deploy and tests/cluster fail while stale).
configs:
	$(PYTHON) deploy/render_config.py
	$(PYTHON) deploy/kubernetes/cluster/render.py

# The web UI's screenshots in docs/web.md, taken by the browser end-to-end test.
screenshots: venv
	GATEWAY_SCREENSHOTS=docs/img $(VPY) -m pytest -q \
	  "tests/integration/test_web_browser.py::test_log_in_find_read_why_release_and_it_arrives[local]" \
	  "tests/integration/test_web_browser.py::test_a_recipient_releases_through_a_digest_link_without_logging_in[local]"

clean:
	rm -rf var/demo .pytest_cache
