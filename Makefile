# Two entry points, each creating the virtual environment when it is missing:
#   make study   - the Fashion-MNIST precision study (finds its data itself)
#   make test    - the test suite
#   make transformer-study - all-MiniLM-L6-v2 in fp32, bf16, int8 and the mixed recipe
#   make search-study - sensitivity and the precision search on all-MiniLM-L6-v2
#   make cnn-study - ResNet-8 (Fashion-MNIST) and DS-CNN (spoken digits): uniform, searched, random policies
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-stamp
# Use the shared data folder beside the checkout when there is one.
SHARED_DATA := $(abspath ../shared/data)
ifneq ($(wildcard $(SHARED_DATA)/fashion-mnist),)
export MIXPREC_DATA ?= $(SHARED_DATA)
endif

.PHONY: study transformer-study search-study cnn-study docs test clean

$(STAMP): pyproject.toml constraints.txt
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install --quiet --disable-pip-version-check -c constraints.txt -e '.[test]'
	touch $(STAMP)

study: $(STAMP)
	$(VENV)/bin/mixprec fashion-mnist --out runs/fashion-mnist

transformer-study: $(STAMP)
	$(VENV)/bin/mixprec transformer-study --out runs/minilm

search-study: $(STAMP)
	$(VENV)/bin/mixprec search-study --out runs/minilm-search

cnn-study: $(STAMP)
	$(VENV)/bin/mixprec cnn-study --out runs/cnn

docs: $(STAMP)
	$(PY) tools/api_reference.py --out site

test: $(STAMP)
	$(PY) -m pytest -q

clean:
	rm -rf $(VENV) runs .pytest_cache .hypothesis
