-- Raised by the statement that ends a batch (numbers its events and writes
-- its new runs) when one of the new runs meets a run another server
-- stored meanwhile under the same idempotency key: the statement, and the
-- batch, fail as a serialization failure does, and run again.
CREATE FUNCTION runledger_new_run_raced() RETURNS BIGINT
LANGUAGE plpgsql VOLATILE AS $$
BEGIN
    RAISE EXCEPTION 'a new run met one stored meanwhile under the same key'
        USING ERRCODE = 'serialization_failure';
END
$$;
