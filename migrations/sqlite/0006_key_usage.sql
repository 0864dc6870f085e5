-- Requests per API key per UTC day, for daily quotas that survive restarts.
CREATE TABLE key_usage (
    key_id   TEXT NOT NULL,
    day      INTEGER NOT NULL,
    requests INTEGER NOT NULL,
    PRIMARY KEY (key_id, day)
) STRICT, WITHOUT ROWID;
