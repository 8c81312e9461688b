# xendbg: every target does its own set-up, idempotently, on a fresh Debian 12 machine (as root).
SHELL := /bin/bash
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
GUESTS := build/guests
# make test also boots Xen + dom0 under QEMU (the Xen lab, docs/xen-lab.md); LAB=0 skips it.
# LAB_ONLY="lab-boot xen-list" runs only the named lab scenarios.
LAB ?= 1
LAB_ONLY ?=
APT_LAB_PKGS := qemu-system-x86 mmdebstrap cpio
APT_LAB_CMDS := qemu-system-x86_64 mmdebstrap cpio
APT_TEST_PKGS := gdb lldb binutils qemu-system-x86 make libxen-dev gcc
APT_TEST_CMDS := gdb lldb as ld objdump qemu-system-x86_64 gcc

.PHONY: install demo test test-deps guests lint typecheck pytest bench clean lab-deps lab-test

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

# On a terminal: the interactive REPL.  Otherwise (CI, pipes): a scripted tour, then quit.
demo: install guests
	@if [ -t 0 ]; then $(BIN)/xendbg repl --emu $(GUESTS)/longmode.elf; \
	else $(BIN)/xendbg repl --emu $(GUESTS)/longmode.elf --echo -x examples/demo.cmds </dev/null; fi

test-deps:
	@missing=""; for c in $(APT_TEST_CMDS); do command -v $$c >/dev/null || missing="$$missing $$c"; done; \
	[ -f /usr/include/xenctrl.h ] || missing="$$missing libxen-dev"; \
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
	@if [ "$(LAB)" = 1 ]; then $(MAKE) --no-print-directory lab-test; else echo "lab-test skipped (LAB=$(LAB))"; fi

lab-deps:
	@missing=""; for c in $(APT_LAB_CMDS); do command -v $$c >/dev/null || missing="$$missing $$c"; done; \
	if [ -n "$$missing" ]; then echo "missing:$$missing — installing Debian packages"; \
	  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $(APT_LAB_PKGS); fi

# Builds (once, cached outside the work tree) and boots the dom0 image; results in build/xenlab/.
lab-test: install guests lab-deps
	$(BIN)/python tests/lab/xenlab.py $(if $(strip $(LAB_ONLY)),--only $(LAB_ONLY))

bench: install guests
	$(BIN)/python bench/emu_speed.py $(GUESTS)/longmode.elf

clean:
	rm -rf build $(VENV) .mypy_cache .ruff_cache .pytest_cache
