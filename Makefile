# One entry point. Every target creates .venv on a fresh clone.
PY      := .venv/bin/python
VENV_OK := .venv/.installed

.PHONY: study test bench lab smoke clean

$(VENV_OK): pyproject.toml
	test -x $(PY) || python3.11 -m venv .venv || python3 -m venv .venv
	$(PY) -m pip install -q --upgrade pip==26.3
	$(PY) -m pip install -q torch==2.13.0          # first and alone: CPU build, no CUDA
	$(PY) -m pip install -q -e .
	$(PY) -m pip check
	$(PY) -m ipykernel install --sys-prefix --name python3 >/dev/null
	touch $(VENV_OK)

study: $(VENV_OK)       ## the whole study on the default config
	.venv/bin/emlab run configs/default.yaml

smoke: $(VENV_OK)       ## the same pipeline, tiny
	.venv/bin/emlab run configs/smoke.yaml

test: $(VENV_OK)        ## unit tests, the smoke run end to end, nbval over the committed notebooks
	bash tests/run_tests.sh

bench: $(VENV_OK)
	$(PY) bench/run.py --study   # the ratios (minutes), then the default study from scratch (about 35 min on 2 cores)

lab: $(VENV_OK)
	$(PY) -m pip install -q -e ".[lab]"
	.venv/bin/jupyter lab notebooks/

clean:
	rm -rf data/smoke data/test-*
