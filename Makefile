# dsreceiver: run it, test it.  dsreceiver.py itself needs nothing but python3.
PYTHON ?= python3
VENV ?= .venv
VENV_PYTHON := $(VENV)/bin/python
HOSTNAME ?= $(shell $(PYTHON) -c 'import socket; print(socket.getfqdn())')
PYTEST_ARGS ?=

.PHONY: test test-fast lint fuzz bench run certs readme-help tls-scan clean

$(VENV)/.installed: requirements-test.txt
	$(PYTHON) -m venv $(VENV)
	$(VENV_PYTHON) -m pip install --quiet --disable-pip-version-check -r requirements-test.txt
	touch $@

## test: the full suite (what CI runs)
test: $(VENV)/.installed
	$(VENV_PYTHON) -m pytest $(PYTEST_ARGS)

## test-fast: the suite without tests marked slow, three at a time (they wait on servers as much as they compute)
test-fast: $(VENV)/.installed
	$(VENV_PYTHON) -m pytest -m "not slow" -n 3 $(PYTEST_ARGS)

## lint: ruff over everything, mypy --strict over dsreceiver.py (as Python 3.8), tests/ and tools/ (settings:
## pyproject.toml), then the shape of dsreceiver.py (tools/check_shape.py: sections, dependency order, lengths)
lint: $(VENV)/.installed
	$(VENV)/bin/ruff check .
	$(VENV)/bin/mypy dsreceiver.py
	$(VENV)/bin/mypy --python-version "$$($(VENV_PYTHON) -c 'import sys; print("%d.%d" % sys.version_info[:2])')" tests tools
	$(VENV_PYTHON) tools/check_shape.py dsreceiver.py

## fuzz: the fuzz targets with many more examples (FUZZ_EXAMPLES, bounded to 20 minutes)
FUZZ_EXAMPLES ?= 50000
fuzz: $(VENV)/.installed
	FUZZ_EXAMPLES=$(FUZZ_EXAMPLES) $(VENV_PYTHON) -m pytest tests/test_fuzz.py --timeout=1200 $(PYTEST_ARGS)

## bench: dsreceiver vs the Flask how-to vs nginx (BENCH_ARGS="--seconds 15 --scenarios ABCDE")
BENCH_VENV ?= .venv-bench
BENCH_ARGS ?=
$(BENCH_VENV)/.installed: bench/requirements.txt
	$(PYTHON) -m venv $(BENCH_VENV)
	$(BENCH_VENV)/bin/python -m pip install --quiet --disable-pip-version-check -r bench/requirements.txt
	touch $@

bench: $(BENCH_VENV)/.installed
	@command -v wrk >/dev/null && [ -x /usr/sbin/nginx ] || { apt-get update -qq && \
		DEBIAN_FRONTEND=noninteractive apt-get install -y -qq wrk nginx-light libnginx-mod-stream; } || \
		echo "wrk or nginx could not be installed: using the built-in load generator, without nginx"
	$(BENCH_VENV)/bin/python bench/bench.py $(BENCH_ARGS)

## run: serve with the defaults (https://0.0.0.0:8443, ./certs, ./data)
run:
	$(PYTHON) dsreceiver.py

## certs: create a self-signed certificate for HOSTNAME in certs/ (keeps an existing one)
certs:
	@if [ -e certs/fullchain.pem ] || [ -e certs/privkey.pem ]; then \
		echo "certs/ already holds a certificate or key; remove them first"; \
	else \
		$(PYTHON) -c 'import sys; from pathlib import Path; import dsreceiver as d; d.create_self_signed(Path("certs/fullchain.pem"), Path("certs/privkey.pem"), sys.argv[1])' "$(HOSTNAME)" \
		&& echo "created certs/fullchain.pem for $(HOSTNAME): upload it as the stream's CA certificate"; \
	fi

## readme-help: refresh the --help block in README.md
readme-help:
	COLUMNS=100 $(PYTHON) dsreceiver.py --help > .help.txt
	$(PYTHON) -c 'import re; h = open(".help.txt").read(); t = open("README.md").read(); \
	b = "<!-- help:begin -->\n```text\n" + h + "```\n<!-- help:end -->"; \
	open("README.md", "w").write(re.sub(r"<!-- help:begin -->.*?<!-- help:end -->", lambda m: b, t, flags=re.S))'
	rm -f .help.txt

## tls-scan: scan a running endpoint's TLS with sslyze (TARGET=host:port, default localhost:8443)
TARGET ?= localhost:8443
tls-scan:
	test -x .venv-scan/bin/sslyze || ($(PYTHON) -m venv .venv-scan && .venv-scan/bin/pip install --quiet sslyze==6.3.1)
	.venv-scan/bin/sslyze $(TARGET) --sslv2 --sslv3 --tlsv1 --tlsv1_1 --tlsv1_2 --tlsv1_3 --compression \
		--reneg --heartbleed --robot --openssl_ccs --fallback --elliptic_curves

clean:
	rm -rf $(VENV) .venv-scan .venv-bench .pytest_cache tests/__pycache__ __pycache__
