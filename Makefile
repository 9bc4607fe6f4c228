# keyhaven: `make test` installs what the tests need (apt-get, when missing) and
# runs every test: Rust unit and integration tests (some groups a second time
# on PostgreSQL), then the compatibility tests with third-party TrueNAS clients.
# `make bench` runs the benchmarks; `make deb` builds the Debian package
# (release build, cargo-deb).

CARGO ?= cargo

.PHONY: test deps rust-tests compat-tests bench lint deb

test: deps rust-tests compat-tests

deps:
	bash scripts/install-test-deps.sh

# The API groups for keychain, accounts and auth run a second time with every
# daemon's state in PostgreSQL (a throwaway cluster of the test's own).
PG_GROUPS = keychain:: accounts:: api_auth::

rust-tests:
	$(CARGO) build --workspace --all-targets
	$(CARGO) test --workspace --no-fail-fast
	KEYHAVEN_TEST_BACKEND=postgres $(CARGO) test -p keyhaven --test integration --no-fail-fast -- $(PG_GROUPS)

compat-tests:
	KEYHAVEN_BIN=target/debug/keyhaven bash tests/compat/run.sh

lint:
	$(CARGO) fmt --all -- --check
	$(CARGO) clippy --workspace --all-targets -- -D warnings

bench: deps
	$(CARGO) bench --bench keyhaven

# The Debian package (release build): target/debian/keyhaven_<version>_amd64.deb
deb:
	bash scripts/build-deb.sh
