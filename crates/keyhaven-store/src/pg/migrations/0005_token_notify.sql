-- keyhaven's PostgreSQL schema, step 5: removing a reusable token is announced.
-- A session opened with a reusable (not single-use) token lasts as long as the
-- token: when the row goes (it expired and was pruned, its account was
-- deleted) every node must look at its sessions again. The same channel and
-- payload as migration 0002 (`<node>|tokens|<id>`); the node moves its
-- accounts' generation, so each session checks its token on its next call.
-- Single-use tokens are deleted by the login that takes them: nothing to
-- announce, and one notification per login would cost every node a look at
-- every session.
CREATE TRIGGER tokens_notify AFTER DELETE ON tokens
    FOR EACH ROW WHEN (NOT OLD.single_use)
    EXECUTE FUNCTION keyhaven_notify_change('id');
