-- Each rate-limited key's token bucket, shared by every server on the
-- database, so that a key's rate holds for all of them together.
CREATE TABLE key_buckets (
    tenant_id TEXT NOT NULL,
    key_id    TEXT NOT NULL,
    -- Tokens left at `at` (microseconds since the epoch, the database's
    -- clock).
    tokens    DOUBLE PRECISION NOT NULL,
    at        BIGINT NOT NULL,
    PRIMARY KEY (tenant_id, key_id)
);
