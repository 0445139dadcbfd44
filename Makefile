.PHONY: run test check

# Run the gateway on the bundled models.d (a tiny real engine, no GPU needed) at http://127.0.0.1:8009/v1
run:
	scripts/bootstrap.sh
	.venv/bin/sparkgate serve --config-dir models.d

# Install what the tests need and run them all (CI runs exactly this)
test:
	scripts/test.sh

check:
	.venv/bin/sparkgate check --config-dir models.d
