# The two commands of the README. Both set up .venv on first use (scripts/setup.sh, about 3 minutes).
.PHONY: setup demo demo-llm check test bench study

setup:
	@scripts/setup.sh

demo: setup
	RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0 .venv/bin/fl-simulate $(ARGS)

demo-llm: setup
	RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0 .venv/bin/fl-simulate +experiment=llm $(ARGS)

# The pre-deployment gate: lint, types, bandit and the dependency audit (scripts/check_deploy.py), and the chart,
# compose file and Dockerfile rendered, parsed and validated (tests/test_packaging.py). `make test` runs it first.
check: setup
	.venv/bin/ruff check .
	.venv/bin/mypy fl_core fl_server fl_client strategies privacy gateway scripts
	.venv/bin/python scripts/check_deploy.py
	.venv/bin/python -m pytest -q -p no:cacheprovider tests/test_packaging.py

test: check
	RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0 .venv/bin/python -m pytest -q -p no:cacheprovider tests \
		--ignore=tests/test_packaging.py

bench: setup
	.venv/bin/python scripts/bench_dp_step.py
	.venv/bin/python scripts/bench_frozen_prefix.py
	.venv/bin/python scripts/bench_frozen_prefix.py --model smollm2
	RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0 .venv/bin/python scripts/bench_federated_round.py
	.venv/bin/python scripts/bench_gateway.py

study: setup
	RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0 .venv/bin/python -m scripts.study $(ARGS)
