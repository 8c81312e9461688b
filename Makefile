# xendbg: every target does its own set-up, idempotently, on a fresh Debian 12 machine (as root).
SHELL := /bin/bash
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
GUESTS := build/guests
APT_TEST_PKGS := gdb lldb binutils qemu-system-x86 make
APT_TEST_CMDS := gdb lldb as ld objdump qemu-system-x86_64

.PHONY: install demo test test-deps guests lint typecheck pytest bench clean

install: $(STAMP)

$(STAMP): pyproject.toml constraints.txt
	@if ! $(PY) -c 'import ensurepip, venv' 2>/dev/null; then \
	  echo "installing python3-venv"; apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq python3-venv; fi
	@if ! command -v as >/dev/null || ! command -v ld >/dev/null; then \
	  echo "installing binutils"; apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq binutils; fi
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -c constraints.txt -e '.[dev]'
	touch $@

guests: install
	$(MAKE) -s -C tests/guests OUT=$(CURDIR)/$(GUESTS)

demo: install guests
	$(BIN)/xendbg demo --emu $(GUESTS)/longmode.elf

test-deps:
	@missing=""; for c in $(APT_TEST_CMDS); do command -v $$c >/dev/null || missing="$$missing $$c"; done; \
	if [ -n "$$missing" ]; then echo "missing:$$missing — installing Debian packages"; \
	  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $(APT_TEST_PKGS); fi

lint: install
	$(BIN)/ruff check src tests bench
	$(BIN)/ruff format --check src tests bench

typecheck: install
	$(BIN)/mypy

pytest: install test-deps guests
	$(BIN)/pytest -q

test: install test-deps guests lint typecheck pytest

bench: install guests
	$(BIN)/python bench/emu_speed.py $(GUESTS)/longmode.elf

clean:
	rm -rf build $(VENV) .mypy_cache .ruff_cache .pytest_cache
