# kproxyd: every target installs what it needs first, so a fresh Debian 12 machine (as root) needs only make.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
APT_PACKAGES := iptables nftables iproute2 conntrack ipset procps python3-venv python3-pip curl ruby shellcheck \
	python3-bpfcc linux-headers-amd64 qemu-system-x86
STAMP_APT := $(VENV)/.apt-done
STAMP_PIP := $(VENV)/.pip-done
STAMP_BCC := $(VENV)/.bcc-done

.PHONY: setup demo test lint unit netns test-guest bench bench-e2e image image-test clean

setup: $(STAMP_PIP) $(STAMP_BCC)

$(STAMP_APT):
	@missing=""; for p in $(APT_PACKAGES); do dpkg -s $$p >/dev/null 2>&1 || missing="$$missing $$p"; done; \
	if [ -n "$$missing" ]; then \
	  echo "installing Debian packages:$$missing"; \
	  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $$missing; \
	fi
	@[ -x $(PY) ] || $(PYTHON) -m venv $(VENV)
	@touch $@

$(STAMP_PIP): $(STAMP_APT) pyproject.toml
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[test]'
	@touch $@

# The eBPF mode compiles with bcc at start-up. bcc is Debian's (built for Debian's python3, pure Python over
# ctypes): a .pth names a folder that links only bcc, so the rest of dist-packages stays out of the venv.
# bcc needs kernel headers under /lib/modules/$$(uname -r); when the running kernel ships none (no
# IKHEADERS, no package for it), Debian's linux-headers-amd64 serves: the eBPF programs use uapi types only.
$(STAMP_BCC): $(STAMP_PIP)
	@mkdir -p $(VENV)/bcc-only && ln -sfn /usr/lib/python3/dist-packages/bcc $(VENV)/bcc-only/bcc
	@echo "$(abspath $(VENV))/bcc-only" > $$($(PY) -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')/bcc-only.pth
	@mods=/lib/modules/$$(uname -r); if [ ! -e $$mods/build ]; then \
	  hdr=$$(ls -d /usr/src/linux-headers-*-amd64 | sort -V | tail -1); \
	  echo "linking $$hdr as $$mods/build (no headers for the running kernel)"; \
	  mkdir -p $$mods && ln -sfn $$hdr $$mods/build && ln -sfn $${hdr%-amd64}-common $$mods/source; \
	fi
	@$(PY) -c 'import bcc' && touch $@

demo: setup
	$(VENV)/bin/kproxyd lab demo

lint: setup
	$(VENV)/bin/ruff check kproxyd tests
	$(VENV)/bin/ruff format --check kproxyd tests
	$(VENV)/bin/mypy

unit: setup
	$(PY) -m pytest -q -m 'not netns'

netns: setup
	$(PY) -m pytest -q -m netns

test: lint
	$(PY) -m pytest -q -ra

# The second kernel (Debian's 6.1 under qemu TCG, docs/guest.md): GUEST_PYTEST='tests/netns/test_flows.py -k web'
# (empty: FULL in tests/guest/run.py), GUEST_ARGS='--smp 2 --memory 2048'.
test-guest: setup
	$(PY) -m tests.guest.run $(GUEST_ARGS) -- $(GUEST_PYTEST)

bench: setup
	DEBIAN_FRONTEND=noninteractive apt-get install -y -qq haproxy gcc >/dev/null
	$(PY) -m pip install -q -e '.[bench]'
	$(PY) bench/run.py $(if $(QUICK),--quick) $(if $(MODES),--modes $(MODES))

# One endpoint change end to end, stage by stage (bench/e2e.py): SIZES=1000,30000 MODE=ebpf by default.
bench-e2e: setup
	DEBIAN_FRONTEND=noninteractive apt-get install -y -qq gcc >/dev/null
	$(PY) -m pip install -q -e '.[bench]'
	$(PY) bench/e2e.py $(if $(SIZES),--services $(SIZES)) $(if $(MODE),--mode $(MODE))

image: setup
	DEBIAN_FRONTEND=noninteractive apt-get install -y -qq debootstrap podman runc >/dev/null
	image/build.sh

image-test: image
	KPROXYD_TEST_IMAGE=1 $(PY) -m pytest -q tests/deploy/test_image.py

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache .mypy_cache .ruff_cache
