#!/usr/bin/env bash
# Installs what keyhaven's tests need on a fresh Debian machine, only when missing:
# OpenSSH's server and client (sshd, ssh, ssh-keygen, ssh-keyscan), openssl (key
# interop tests), rsync (rsync tasks), Python's venv module (compatibility tests with pytruenas and
# aiotruenas-client), Chromium and chromedriver, Firefox ESR and geckodriver (web
# UI tests; Debian does not package geckodriver, so it is built from crates.io),
# and for the Debian package's test: lintian, systemd-analyze (package systemd),
# strip (binutils), age (the backup tests open keyhaven's backups with `age -d`,
# typing the passphrase through `script`'s terminal), cargo-deb (built from crates.io by scripts/build-deb.sh)
# and PostgreSQL's server (the PostgreSQL store tests start a throwaway cluster of their own).
set -euo pipefail

missing=()
need() { # need <command-or-path> <package>
  if ! command -v "$1" >/dev/null 2>&1 && [ ! -x "$1" ]; then missing+=("$2"); fi
}
need /usr/sbin/sshd openssh-server
need ssh openssh-client
need ssh-keygen openssh-client
need ssh-keyscan openssh-client
need openssl openssl
need /usr/bin/rsync rsync
need /usr/bin/setpriv util-linux
need chromium chromium
need chromedriver chromium-driver
need firefox-esr firefox-esr
need lintian lintian
need systemd-analyze systemd
need strip binutils
need age age
need script bsdutils
# Debian's postgresql puts initdb under /usr/lib/postgresql/<major>/bin, not on PATH.
if ! command -v initdb >/dev/null 2>&1 && ! compgen -G '/usr/lib/postgresql/*/bin/initdb' >/dev/null; then
  missing+=(postgresql)
fi
if ! python3 -c 'import venv, ensurepip' >/dev/null 2>&1; then missing+=(python3-venv); fi

if [ ${#missing[@]} -gt 0 ]; then
  # shellcheck disable=SC2207
  pkgs=($(printf '%s\n' "${missing[@]}" | sort -u))
  echo "installing test dependencies: ${pkgs[*]}"
  if [ "$(id -u)" -ne 0 ]; then SUDO=sudo; else SUDO=; fi
  export DEBIAN_FRONTEND=noninteractive
  $SUDO apt-get update -qq
  # policy-rc.d may forbid starting services; keyhaven starts its own sshd anyway.
  $SUDO apt-get install -y -qq --no-install-recommends "${pkgs[@]}"
fi
# geckodriver: not in Debian; build the pinned release from crates.io once.
GECKODRIVER_VERSION=0.37.1
if ! command -v geckodriver >/dev/null 2>&1 && [ ! -x "$HOME/.cargo/bin/geckodriver" ]; then
  echo "installing geckodriver $GECKODRIVER_VERSION (cargo install)"
  cargo install --locked --quiet geckodriver --version "$GECKODRIVER_VERSION"
fi
# cargo-deb (the pinned version in scripts/build-deb.sh), built here rather than
# inside the package's test, where its compile would slow the tests beside it.
bash "$(dirname "$0")/build-deb.sh" --tool
# sshd as root needs its privilege-separation directory.
if [ "$(id -u)" -eq 0 ] && [ ! -d /run/sshd ]; then mkdir -p /run/sshd && chmod 0755 /run/sshd; fi
