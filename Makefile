# The two README commands: `make demo` and `make test`. Both set up first (idempotent, fast
# once done).
.PHONY: setup test demo unit mpi-test clean-runs

setup:
	@bash scripts/setup.sh

test: setup
	@bash scripts/test.sh

demo: setup
	@bash scripts/demo.sh

unit: setup
	@.venv/bin/python -m pytest tests/unit

clean-runs:
	rm -rf runs data/demo
