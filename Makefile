# The two commands a newcomer needs (README): `make demo` and `make test`.
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.neuro-mar-installed

.PHONY: setup demo test test-fast clean

$(STAMP): pyproject.toml requirements-nodeps.txt scripts/bootstrap.sh
	VENV=$(VENV) bash scripts/bootstrap.sh
	touch $(STAMP)

setup: $(STAMP)

RUN ?= runs/demo-$(shell date +%Y%m%d-%H%M%S)

demo: $(STAMP)
	$(VENV)/bin/neuro-mar refine --teacher smollm2-135m --preset quick --out $(RUN)

test: $(STAMP)
	$(PY) -m pytest -q

clean:
	rm -rf $(VENV) build *.egg-info
