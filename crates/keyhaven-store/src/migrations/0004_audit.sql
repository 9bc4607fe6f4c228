-- Indexes for audit.query, which filters, orders and pages in SQL, and for
-- audit_prune, which deletes by age (a login flood can make the table large).
-- `CAST(ts AS INTEGER)` is the entry's `message_timestamp`: queries and pruning
-- use exactly this expression so the expression index serves them.
CREATE INDEX audit_message_timestamp ON audit(CAST(ts AS INTEGER));
CREATE INDEX audit_event ON audit(event);
CREATE INDEX audit_username ON audit(username);
CREATE INDEX audit_address ON audit(address);
