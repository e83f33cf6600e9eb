# lntune: `make run` (export + check the CPU library; GPU/ROCm builds when their toolchains exist)
# and `make test` each create or refresh the local virtual environment on their own.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.lntune-installed
BUILD ?= build
HIDDEN ?= 768,1024,4096
DTYPES ?= float32,float16,bfloat16

.PHONY: run test venv toolchains export tune bench lint clean

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[test]'
	touch $@

venv: $(STAMP)

# ROCm export needs ld.lld and the ROCm device bitcode, ISA checks llvm-objdump 17+; installed when
# missing and apt is usable.
toolchains:
	@have_lld=no; have_bc=no; have_objdump=no; \
	if command -v ld.lld >/dev/null || ls /usr/lib/llvm-*/bin/ld.lld >/dev/null 2>&1; then have_lld=yes; fi; \
	if [ -f /usr/lib/x86_64-linux-gnu/amdgcn/bitcode/ocml.bc ] || [ -f /opt/rocm/amdgcn/bitcode/ocml.bc ]; then have_bc=yes; fi; \
	for f in /usr/lib/llvm-*/bin/llvm-objdump; do case $$f in */llvm-1[7-9]/*|*/llvm-2[0-9]/*) have_objdump=yes;; esac; done; \
	if [ $$have_lld = no ] || [ $$have_bc = no ] || [ $$have_objdump = no ]; then \
	  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
	    echo "installing lld-19, llvm-19 and rocm-device-libs for ROCm export and inspection"; \
	    apt-get update -qq >/dev/null && \
	    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq lld-19 llvm-19 rocm-device-libs >/dev/null; \
	  else echo "note: ROCm export needs lld-19 and rocm-device-libs, inspection llvm-19 (apt-get install ...)"; fi; \
	fi

run: venv toolchains
	$(PY) -m lntune targets
	$(PY) -m lntune export --target llvm --hidden $(HIDDEN) --dtype $(DTYPES) -o $(BUILD)/llvm
	$(PY) -m lntune check $(BUILD)/llvm
	$(PY) -m lntune export --target cuda-sm90 --hidden $(HIDDEN) --dtype $(DTYPES) -o $(BUILD)/cuda-sm90
	-$(PY) -m lntune export --target rocm-gfx942 --hidden $(HIDDEN) --dtype $(DTYPES) -o $(BUILD)/rocm-gfx942
	@if nvidia-smi >/dev/null 2>&1; then $(PY) -m lntune check $(BUILD)/cuda-sm90; \
	else echo "no NVIDIA GPU here: $(BUILD)/cuda-sm90 was built, not run (lntune check it on a GPU host)"; fi

test: venv toolchains
	$(PY) -m pytest -q tests

# make export TARGET=cuda-sm90 HIDDEN=768,1024 DTYPES=float32,bfloat16
TARGET ?= llvm
export: venv
	$(PY) -m lntune export --target $(TARGET) --hidden $(HIDDEN) --dtype $(DTYPES) -o $(BUILD)/$(TARGET)

# On a GPU host: make tune TARGET=cuda-sm90 TRIALS=32
TRIALS ?= 32
tune: venv
	$(PY) -m lntune tune --target $(TARGET) --hidden $(HIDDEN) --dtype $(DTYPES) --trials $(TRIALS)

# On a GPU host with torch: make bench TARGET=cuda-sm90
bench: export
	$(PY) -m lntune bench $(BUILD)/$(TARGET)

lint: venv
	$(PY) -m ruff check lntune schedules te_ops tests examples
	$(PY) -m ruff format --check lntune schedules te_ops tests examples

clean:
	rm -rf $(BUILD)
