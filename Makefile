# make run   — create .venv, install the pinned dependencies, run the default experiment
# make test  — the same install, then the whole test suite (what CI runs)
# make clean-state ARGS='--configfile configs/paper.yaml' — delete resumable state that no run
#             of that config owns (stopped runs whose settings changed or left the config)
# make estimate ARGS='--configfile configs/paper.yaml' — jobs, images, GPU- and CPU-hours of that
#             config's DAG before it runs (docs/estimate.md)
PYTHON ?= python3
VENV ?= .venv
CORES ?= 2
BIN := $(VENV)/bin

.PHONY: install run test lint format dag report clean clean-state estimate

install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[dev]'
	touch $@

run: install
	@start=$$(date +%s); \
	$(BIN)/snakemake --profile profiles/local --cores $(CORES) && \
	echo && cat results/tables/summary.md && \
	echo "workflow time: $$(( $$(date +%s) - start )) s (plot: results/plots/id_vs_ood.png)"

test: install
	$(BIN)/pytest

lint: install
	$(BIN)/ruff check .
	$(BIN)/snakefmt --check Snakefile workflow/rules
	$(BIN)/snakemake --lint

format: install
	$(BIN)/ruff check --fix .
	$(BIN)/ruff format .
	$(BIN)/snakefmt Snakefile workflow/rules

report: install
	$(BIN)/snakemake --report results/report.html

dag: install
	$(BIN)/snakemake --rulegraph | dot -Tpng > rulegraph.png

clean-state: install
	$(BIN)/snakemake clean_state --cores 1 $(ARGS)

estimate: install
	$(BIN)/python -m robustft.estimate $(ARGS)

clean:
	rm -rf results .snakemake
