# make run   — create .venv, install the pinned dependencies, run the default experiment
# make test  — the same install (with the optional `clip` extra, so that the zero-shot and FLYP
#             tests run), then the whole test suite (what CI runs)
# make docs  — serve the documentation site (docs/, mkdocs.yml) at http://127.0.0.1:8000
# make clean-state ARGS='--configfile configs/paper.yaml' — delete resumable state that no run
#             of that config owns (stopped runs whose settings changed or left the config)
# make estimate ARGS='--configfile configs/paper.yaml' — jobs, images, GPU- and CPU-hours of that
#             config's DAG before it runs (docs/estimate.md)
# make variants — the default experiment on each toyshift variant of configs/variants/ (another ID
#             domain and seed), one after the other, into results/variants/<name>/ (docs/variants.md)
PYTHON ?= python3
VENV ?= .venv
CORES ?= 2
BIN := $(VENV)/bin
# Extras installed: the tests' tools, CLIP's text tower (zero-shot and FLYP tests) and both
# trackers, so that all their tests run everywhere.
EXTRAS ?= dev,clip,wandb,mlflow

.PHONY: install run test lint format dag report docs clean clean-state estimate variants

install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[$(EXTRAS)]'
	touch $@

run: install
	@start=$$(date +%s); \
	$(BIN)/snakemake --profile profiles/local --cores $(CORES) && \
	echo && cat results/tables/summary.md && \
	echo "workflow time: $$(( $$(date +%s) - start )) s (plot: results/plots/id_vs_ood.png)"

# Each variant in its own directory (--directory), so that none overwrites another's or the
# default's results; config.yaml is named because Snakemake looks for it there, not here.
variants: install
	@for f in configs/variants/*.yaml; do \
	  name=$$(basename $$f .yaml); start=$$(date +%s); \
	  $(BIN)/snakemake --profile profiles/local --cores $(CORES) --configfile config.yaml $$f \
	    --directory results/variants/$$name || exit 1; \
	  echo && cat results/variants/$$name/results/tables/summary.md && \
	  echo "$$name: workflow time $$(( $$(date +%s) - start )) s"; \
	done

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

# NO_MKDOCS_2_WARNING: Material prints a banner about its end of life on every start.
docs: install
	NO_MKDOCS_2_WARNING=1 $(BIN)/mkdocs serve

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
