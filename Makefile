# ddil: `make toy` runs the main job, `make test` the tests. Each sets up .venv on first use.
PY := .venv/bin/python
export PYTHONPATH := $(CURDIR)

.PHONY: toy toy-quick toy-study toy-study-quick test clean-venv help

help:  ## list the targets
	@grep -E '^[a-z-]+:.*## ' Makefile | sed 's/:.*## /\t/'

.venv/.installed: requirements.txt scripts/install.sh
	sh scripts/install.sh

toy: .venv/.installed  ## PD/LCM/DMD2 x {base, +DDIL, +DDIL+reflected}, 3 seeds -> results/toy (about 9 min on 2 cores)
	$(PY) -m toy.suite --seeds 3

toy-quick: .venv/.installed  ## the same, 1 seed and short training (under a minute) -> results/toy-quick
	$(PY) -m toy.suite --quick --out results/toy-quick

toy-study: .venv/.installed  ## the toy study -> results/toy/STUDY.md + figures (about 40 min on 2 cores; resumes from results/toy/cache)
	$(PY) -m toy.study

toy-study-quick: .venv/.installed  ## a small subset of the study (a couple of minutes) -> results/toy-study-quick
	$(PY) -m toy.study --quick --out results/toy-study-quick

test: .venv/.installed  ## all tests (pytest + hypothesis), CPU only, under 5 minutes on 2 cores
	$(PY) -m pytest -q tests

clean-venv:  ## remove the environment
	rm -rf .venv
