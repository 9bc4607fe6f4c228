-- keyhaven schema v1. Forward-only: later changes are new files.
CREATE TABLE meta (
    key   TEXT PRIMARY KEY,
    value BLOB NOT NULL
);

-- Accounts. Non-secret TrueNAS fields live in `data` (JSON) so that the
-- service layer owns their shape; secrets have columns of their own.
CREATE TABLE users (
    id               INTEGER PRIMARY KEY AUTOINCREMENT,
    username         TEXT NOT NULL UNIQUE,
    data             TEXT NOT NULL,
    password_hash    TEXT,
    twofactor_secret BLOB
);

CREATE TABLE api_keys (
    id         INTEGER PRIMARY KEY AUTOINCREMENT,
    name       TEXT NOT NULL UNIQUE,
    username   TEXT NOT NULL,
    key_hash   TEXT NOT NULL,
    created_at INTEGER NOT NULL,
    expires_at INTEGER
);

CREATE TABLE tokens (
    id         INTEGER PRIMARY KEY AUTOINCREMENT,
    token_hash TEXT NOT NULL UNIQUE,
    username   TEXT NOT NULL,
    created_at INTEGER NOT NULL,
    expires_at INTEGER NOT NULL,
    single_use INTEGER NOT NULL,
    origin     TEXT,
    attrs      TEXT NOT NULL
);
CREATE INDEX tokens_expires ON tokens(expires_at);

-- Keychain credentials (SSH_KEY_PAIR and SSH_CREDENTIALS share one namespace).
CREATE TABLE keychain (
    id          INTEGER PRIMARY KEY AUTOINCREMENT,
    name        TEXT NOT NULL UNIQUE,
    type        TEXT NOT NULL,
    attributes  TEXT NOT NULL,
    private_key BLOB,
    created_at  INTEGER NOT NULL
);

CREATE TABLE audit (
    id       INTEGER PRIMARY KEY AUTOINCREMENT,
    ts       REAL NOT NULL,
    username TEXT,
    address  TEXT,
    service  TEXT NOT NULL,
    method   TEXT,
    event    TEXT NOT NULL,
    target   TEXT,
    success  INTEGER NOT NULL,
    error    TEXT
);

-- Singleton configuration documents (ssh config, service state, …), JSON.
CREATE TABLE settings (
    key   TEXT PRIMARY KEY,
    value TEXT NOT NULL
);

CREATE TABLE host_keys (
    id          INTEGER PRIMARY KEY AUTOINCREMENT,
    algorithm   TEXT NOT NULL UNIQUE,
    private_key BLOB NOT NULL,
    public_key  TEXT NOT NULL
);
