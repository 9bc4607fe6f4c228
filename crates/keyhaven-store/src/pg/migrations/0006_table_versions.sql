-- keyhaven's PostgreSQL schema, step 6: change counters (issue 14 §2).
--
-- A node keeps the keychain in memory and follows other nodes' changes
-- through NOTIFY (step 2); every 30 s it also compares it with the database,
-- the safety net for a notification it missed. With thousands of rows that
-- is a full read, so the table has a counter here that every statement
-- changing it moves in its own transaction: a node that read the counter,
-- then the rows, knows its copy holds every change up to that count, and
-- that nothing changed while the counter still reads the same (an update in
-- place moves it as an insert or a delete does; a rolled-back one does not).
--
-- The counter is moved by a statement-level trigger (one row update per
-- statement, whatever the number of rows), so writers of the table queue
-- on its counter row until they commit; notifying writers already queue at
-- commit on PostgreSQL's notification lock. Triggers do not run under
-- `session_replication_role = replica`: a change made that way moves
-- neither the counter nor a notification (as with step 2).
CREATE TABLE keyhaven_table_versions (
    name    TEXT PRIMARY KEY,
    version BIGINT NOT NULL
);
INSERT INTO keyhaven_table_versions (name, version) VALUES ('keychain', 0);

CREATE FUNCTION keyhaven_bump_table_version() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    UPDATE keyhaven_table_versions SET version = version + 1 WHERE name = TG_TABLE_NAME;
    RETURN NULL;
END
$$;

CREATE TRIGGER keychain_version AFTER INSERT OR UPDATE OR DELETE OR TRUNCATE ON keychain
    FOR EACH STATEMENT EXECUTE FUNCTION keyhaven_bump_table_version();
