#!/usr/bin/env bash
# Makes tests/fixtures/upgrade-v1/: a data dir (keyhaven.db, master.key) whose
# database has the first release's schema — exactly what migration 0001
# creates — holding sample records, and expected.json, what the API showed
# of them. tests/integration/upgrade.rs opens it with the current binary.
#
# How: today's keyhaven creates the records through its API (so every stored
# field has the shape the service layer writes, secrets sealed under the
# fixture's master.key); then each later migration is undone (its tables and
# indexes dropped, its column removed, user_version set to 1) and the schema
# is checked to be, statement for statement, the one migration 0001 makes.
# Run it once per new fixture (root, from the repository root); commit the result.
set -euo pipefail
cd "$(dirname "$0")/.."
out=tests/fixtures/upgrade-v1
cargo build --quiet --bin keyhaven
bin=target/debug/keyhaven
mkdir -p /var/lib/keyhaven-fixture && chmod 0755 /var/lib/keyhaven-fixture
data=$(mktemp -d /var/lib/keyhaven-fixture/data.XXXXXX)
chmod 0711 "$data"
pass='correct horse battery staple'  # the tests' admin password (tests/integration/util.rs)
KEYHAVEN_ADMIN_PASSWORD="$pass" KEYHAVEN_LOG=warn "$bin" serve --data-dir "$data" --listen 127.0.0.1:0 >"$data/.out" 2>"$data/.err" &
pid=$!
trap 'kill $pid 2>/dev/null || true; rm -rf "$data"; rmdir /var/lib/keyhaven-fixture 2>/dev/null || true' EXIT
for _ in $(seq 100); do grep -q 'listening on' "$data/.out" 2>/dev/null && break; sleep 0.1; done
call() { "$bin" call --data-dir "$data" "$@"; }
for alg in ED25519 RSA ECDSA; do
  kp=$(call keychaincredential.generate_ssh_key_pair "{\"key_type\": \"$alg\"}")
  call keychaincredential.create "{\"name\": \"fixture-$alg\", \"type\": \"SSH_KEY_PAIR\", \"attributes\": $kp}" >/dev/null
done
pub=$(call keychaincredential.query '[["name", "=", "fixture-ED25519"]]' '{"get": true}' | python3 -c 'import json,sys; print(json.load(sys.stdin)["attributes"]["public_key"])')
call keychaincredential.create "{\"name\": \"fixture-public-only\", \"type\": \"SSH_KEY_PAIR\", \"attributes\": {\"public_key\": \"$pub\"}}" >/dev/null
id=$(call keychaincredential.query '[["name", "=", "fixture-ED25519"]]' '{"get": true}' | python3 -c 'import json,sys; print(json.load(sys.stdin)["id"])')
call keychaincredential.create "{\"name\": \"fixture-connection\", \"type\": \"SSH_CREDENTIALS\", \"attributes\": {\"host\": \"192.0.2.10\", \"port\": 2222, \"username\": \"backup\", \"private_key\": $id, \"remote_host_key\": \"$pub\", \"connect_timeout\": 15}}" >/dev/null
root=$(call user.query '[["username", "=", "root"]]' '{"get": true}' | python3 -c 'import json,sys; print(json.load(sys.stdin)["id"])')
call user.update "$root" "{\"sshpubkey\": \"$pub\"}" >/dev/null
call api_key.create '{"name": "fixture-key", "username": "admin"}' >/dev/null
call ssh.update '{"tcpport": 2222, "passwordauth": false}' >/dev/null
mkdir -p "$out"
python3 - "$data" "$out" <<'PY'
import json, subprocess, sys
data, out = sys.argv[1], sys.argv[2]
def call(*a):
    return json.loads(subprocess.check_output(["target/debug/keyhaven", "call", "--data-dir", data, *a]))
expected = {
    "keychain": call("keychaincredential.query", "[]", '{"order_by": ["id"]}'),
    "users": call("user.query", "[]", '{"order_by": ["id"]}'),
    "api_keys": [{k: v for k, v in a.items() if k in ("id", "name", "username")} for a in call("api_key.query")],
    "ssh": {k: v for k, v in call("ssh.config").items() if k in ("tcpport", "passwordauth")},
}
json.dump(expected, open(f"{out}/expected.json", "w"), indent=1, sort_keys=True)
PY
kill -TERM $pid; wait $pid || true
python3 - "$data/keyhaven.db" <<'PY'
import sqlite3, sys, re
db = sqlite3.connect(sys.argv[1])
db.executescript("""
PRAGMA journal_mode = DELETE;
DROP TABLE IF EXISTS schema_history;                                   -- 0007
DROP TABLE rsync_last_success;                                         -- 0006
DROP TABLE rsync_runs; DROP TABLE rsync_tasks;                         -- 0005
DROP INDEX audit_message_timestamp; DROP INDEX audit_event;            -- 0004
DROP INDEX audit_username; DROP INDEX audit_address;
ALTER TABLE users DROP COLUMN totp_last_step;                          -- 0003
DROP TABLE connection_tests;                                           -- 0002
DELETE FROM audit; DELETE FROM tokens;
PRAGMA user_version = 1;
""")
db.commit()
db.execute("VACUUM")
fresh = sqlite3.connect(":memory:")
fresh.executescript(open("crates/keyhaven-store/src/migrations/0001_initial.sql").read())
norm = lambda c: sorted((t, n, re.sub(r"\s+", " ", (s or "")).replace("( ", "(").replace(" )", ")").strip())
                        for t, n, s in c.execute("SELECT type, name, sql FROM sqlite_master WHERE name NOT LIKE 'sqlite_%'"))
assert norm(db) == norm(fresh), ("schema is not migration 0001's", norm(db), norm(fresh))
PY
cp "$data/keyhaven.db" "$data/master.key" "$out/"
chmod 0600 "$out/keyhaven.db" "$out/master.key"
echo "wrote $out (schema version 1)"
