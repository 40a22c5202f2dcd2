# Everything a fresh Debian/Ubuntu machine needs, in order. The two entry points:
#   make serve   run the API on http://127.0.0.1:8000 (serve run configs/serve.yaml)
#   make test    run the whole test suite
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
PIP := $(VENV)/bin/pip
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)

# Ray's local behaviour, decided explicitly (docs/operations.md): no usage stats; no token auth on
# this single-machine, loopback-only cluster (Ray 2.60 otherwise writes a token that later breaks
# `serve deploy`); never bind Ray's ports beyond loopback.
export RAY_USAGE_STATS_ENABLED := 0
export RAY_AUTH_MODE := disabled
export RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER := 0
# Strip client-controlled timeout headers at Serve's proxy (serve_app/proxy_middleware.py).
export RAY_SERVE_HTTP_PROXY_CALLBACK_IMPORT_PATH := serve_app.proxy_middleware:proxy_middlewares

# redis-server and clamd are real dependencies (tests and `make serve` run their own, on loopback);
# prometheus brings promtool, which checks the alert rules in the tests; nginx runs the front proxy
# config (deploy/nginx) in its test.
APT_PACKAGES := libmagic1 espeak-ng redis-server redis-sentinel clamav-daemon prometheus nginx
SAMPLE := var/sample.wav
SERVICES := var/services
PEPPER := var/api-key-pepper
DEV_KEY := var/dev-api-key
SAMPLE_TEXT := The quick brown fox jumps over the lazy dog while the band plays on.
SAMPLE_TEXT_FILE := var/sample.txt

.PHONY: serve test venv system-deps sample services stop-services clean

system-deps:
	@missing=$$(for package in $(APT_PACKAGES); do dpkg -s $$package >/dev/null 2>&1 || echo $$package; done); \
	if [ -n "$$missing" ]; then \
		echo "installing Debian packages:" $$missing; \
		$(SUDO) apt-get update -qq && DEBIAN_FRONTEND=noninteractive $(SUDO) apt-get install -y -qq $$missing; \
	fi

$(VENV)/.installed: pyproject.toml client/pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	# The CPU build of torch first (a plain `torch` requirement would pull a multi-GB CUDA build).
	$(PIP) install -q torch==2.13.0
	# constraints.txt: the versions the tests passed with, so a fresh install resolves to them.
	$(PIP) install -q -e ".[qwen3,test]" -c constraints.txt
	# The client and its forced-align command: a distribution of its own (client/pyproject.toml).
	$(PIP) install -q -e ./client -c constraints.txt
	touch $@

venv: $(VENV)/.installed

$(SAMPLE): | system-deps
	mkdir -p $(dir $@)
	espeak-ng -v en-us -s 140 -w $@ "$(SAMPLE_TEXT)"

$(SAMPLE_TEXT_FILE):
	mkdir -p $(dir $@)
	printf '%s\n' "$(SAMPLE_TEXT)" > $@

sample: $(SAMPLE) $(SAMPLE_TEXT_FILE)

# Where the service finds its dependencies and its one secret (serve_app.settings.Environment).
export ALIGNER_REDIS_URL := redis://127.0.0.1:6380/0
export ALIGNER_CLAMD_ADDRESS := unix://$(CURDIR)/$(SERVICES)/clamd/clamd.sock
export ALIGNER_API_KEY_PEPPER_FILE := $(CURDIR)/$(PEPPER)
export ALIGNER_SPOOL_DIR := $(CURDIR)/var/spool

$(PEPPER):
	mkdir -p $(dir $@)
	umask 077 && head -c 32 /dev/urandom | base64 > $@

# Redis (append-only, port 6380) and clamd (generated signature DB), as background daemons.
services: venv system-deps
	$(PY) -m tools.local_services start $(SERVICES)

stop-services:
	$(PY) -m tools.local_services stop $(SERVICES)

# A local development key (align + admin), created once and kept in var/ (never committed).
$(DEV_KEY): | $(PEPPER) services
	umask 077 && $(PY) -m serve_app.cli keys create --owner local-dev --scope align --scope admin --plan premium \
		| sed -n 's/^api_key: //p' > $@

serve: venv system-deps sample $(PEPPER) services $(DEV_KEY)
	@echo
	@echo "  Starting the API on http://127.0.0.1:8000 (ready in ~30 s). Try:"
	@echo "    curl -s -H \"Authorization: Bearer \$$(cat $(DEV_KEY))\" -F audio=@$(SAMPLE) -F 'text=$(SAMPLE_TEXT)' http://127.0.0.1:8000/v1/align"
	@echo "  Or with the client (client/, installed in $(VENV)):"
	@echo "    FORCED_ALIGNER_API_KEY=\$$(cat $(DEV_KEY)) $(VENV)/bin/forced-align $(SAMPLE) --text $(SAMPLE_TEXT_FILE) --format srt"
	@echo "  Docs: http://127.0.0.1:8000/v1/docs   Readiness: http://127.0.0.1:8000/v1/ready   Ray dashboard: http://127.0.0.1:8265"
	@echo "  Local dev key (align + admin) in $(DEV_KEY); Redis and clamd keep running: make stop-services"
	@echo
	$(VENV)/bin/serve run configs/serve.yaml

test: venv system-deps
	$(PY) -m pytest

clean: stop-services
	rm -rf $(VENV) var
