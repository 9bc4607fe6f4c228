-- Which keyhaven release brought the database to which schema version, and
-- when. An older keyhaven that finds a newer schema reads the newest row to
-- say which version is needed (see db::check_schema_known).
CREATE TABLE schema_history (
    version          INTEGER PRIMARY KEY,
    from_version     INTEGER NOT NULL,
    keyhaven_version TEXT NOT NULL,
    applied_at       INTEGER NOT NULL
);
