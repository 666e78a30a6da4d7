# Two commands for a newcomer: `make demo` and `make test`. Both set everything up first.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
EXTRAS ?= cpu,demo,dev
comma  := ,
STAMP  := $(VENV)/.installed-$(subst $(comma),-,$(EXTRAS))

.PHONY: install test demo clean

install: $(STAMP)

# Re-runs only when pyproject.toml changes; pip takes torch from the local disk where it lies.
$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --disable-pip-version-check -e ".[$(EXTRAS)]"
	touch $@

test: install
	HF_HUB_OFFLINE=1 $(PY) -m pytest -q

demo: install
	HF_HUB_OFFLINE=1 $(PY) -m jobs.predict --sample-photos --top 3

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache
