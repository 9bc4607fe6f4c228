-- Several nodes, one truth (issue 14 §2), schema version 2.
--
-- 1. Change notification. Each node keeps state derived from these tables in
--    memory or on disk (the keychain cache, the accounts' generation that
--    sessions check, the authorized_keys files sshd reads, sshd's
--    configuration and host keys). Every committed change to one of their
--    rows is announced on channel `keyhaven_changes` with the payload
--    `<node>|<table>|<key>`: `<node>` is the writing connection's
--    `keyhaven.node` setting (each node sets its own at connect; empty for
--    other clients such as psql), `<key>` the row's key column named by the
--    trigger's argument. NOTIFY is sent at commit (never for a rolled-back
--    change) and identical payloads of one transaction are sent once.
--    A node that misses notifications (its listening connection broke)
--    treats everything as changed after reconnecting, and reconciles fully
--    every 30 s anyway.
CREATE FUNCTION keyhaven_notify_change() RETURNS trigger LANGUAGE plpgsql AS $$
DECLARE
    node TEXT := coalesce(current_setting('keyhaven.node', true), '');
    new_key TEXT;
    old_key TEXT;
BEGIN
    IF TG_OP <> 'DELETE' THEN
        new_key := coalesce(to_jsonb(NEW) ->> TG_ARGV[0], '');
        PERFORM pg_notify('keyhaven_changes', node || '|' || TG_TABLE_NAME || '|' || new_key);
    END IF;
    IF TG_OP <> 'INSERT' THEN
        old_key := coalesce(to_jsonb(OLD) ->> TG_ARGV[0], '');
        IF new_key IS DISTINCT FROM old_key THEN
            PERFORM pg_notify('keyhaven_changes', node || '|' || TG_TABLE_NAME || '|' || old_key);
        END IF;
    END IF;
    RETURN NULL;
END
$$;

-- Accounts by name: a deleted account's keys file is withdrawn by name.
CREATE TRIGGER users_notify AFTER INSERT OR UPDATE OR DELETE ON users
    FOR EACH ROW EXECUTE FUNCTION keyhaven_notify_change('username');
CREATE TRIGGER api_keys_notify AFTER INSERT OR UPDATE OR DELETE ON api_keys
    FOR EACH ROW EXECUTE FUNCTION keyhaven_notify_change('id');
CREATE TRIGGER keychain_notify AFTER INSERT OR UPDATE OR DELETE ON keychain
    FOR EACH ROW EXECUTE FUNCTION keyhaven_notify_change('id');
CREATE TRIGGER settings_notify AFTER INSERT OR UPDATE OR DELETE ON settings
    FOR EACH ROW EXECUTE FUNCTION keyhaven_notify_change('key');
CREATE TRIGGER host_keys_notify AFTER INSERT OR UPDATE OR DELETE ON host_keys
    FOR EACH ROW EXECUTE FUNCTION keyhaven_notify_change('algorithm');
CREATE TRIGGER rsync_tasks_notify AFTER INSERT OR UPDATE OR DELETE ON rsync_tasks
    FOR EACH ROW EXECUTE FUNCTION keyhaven_notify_change('id');

-- 2. Failed logins shared by every node, so an attacker cannot multiply the
--    login limits by the number of nodes. One row per limiter key
--    (`ua:<user>\n<address>`, `a:<address>`, `u:<user>`): failures in the
--    current window, the last one (Unix seconds) and, once the key's limit
--    is reached, until when it is locked. Rows whose window and lock are
--    over are pruned.
CREATE TABLE login_failures (
    key          TEXT PRIMARY KEY,
    failures     INTEGER NOT NULL,
    last_at      BIGINT NOT NULL,
    locked_until BIGINT
);
CREATE INDEX login_failures_last_at ON login_failures(last_at);
