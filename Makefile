# Usual verbs. `make install` first; everything else runs inside .venv.
VENV ?= .venv
PY := $(VENV)/bin/python

.PHONY: install test lint typecheck proto proto-check certs bench demo

install:
	python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e ".[dev]"

test:
	FEDGATE_TEST_DATABASE_URL=$${FEDGATE_TEST_DATABASE_URL:-postgresql+psycopg://postgres@127.0.0.1:5432/test} $(PY) -m pytest -q

lint:
	$(VENV)/bin/ruff check .

typecheck:
	$(VENV)/bin/mypy

proto:
	$(PY) scripts/gen_proto.py

proto-check:
	$(PY) scripts/gen_proto.py --check

certs:
	$(VENV)/bin/fedgate certs dev --out certs_dev

bench:
	$(PY) -m bench

demo:
	$(VENV)/bin/fedgate demo
