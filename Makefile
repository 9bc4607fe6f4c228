# keyhaven: `make test` installs what the tests need (apt-get, when missing) and
# runs every test: Rust unit and integration tests, then the compatibility
# tests with third-party TrueNAS clients. `make bench` runs the benchmarks;
# `make deb` builds the Debian package (release build, cargo-deb).

CARGO ?= cargo

.PHONY: test deps rust-tests compat-tests bench lint deb

test: deps rust-tests compat-tests

deps:
	bash scripts/install-test-deps.sh

rust-tests:
	$(CARGO) build --workspace --all-targets
	$(CARGO) test --workspace --no-fail-fast

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
