-- Every exchange call exwatch makes, one row each. The first six columns are the runbook's, with its names and
-- meanings, so its investigation query runs unchanged:
--   SELECT endpoint, success, response_time, error_message, created_at FROM api_call_logs
--   WHERE provider = 'kraken' AND created_at > NOW() - INTERVAL '30 minutes' ORDER BY created_at DESC LIMIT 50;
CREATE TABLE api_call_logs (
    -- UUIDv7 chosen by exwatch before the insert, so a replayed batch is written once (ON CONFLICT DO NOTHING).
    id             uuid        PRIMARY KEY,
    provider       text        NOT NULL,
    endpoint       text        NOT NULL,
    success        boolean     NOT NULL,
    -- Milliseconds from sending the request to the last byte of the answer.
    response_time  integer     NOT NULL,
    error_message  text,
    created_at     timestamptz NOT NULL,
    http_status    integer,
    -- exwatch's error taxonomy (maintenance, rate_limited, auth, network, ...), or not_permitted.
    error_class    text,
    -- Kraken's own error strings, comma-separated, as sent.
    exchange_error text,
    -- The replica that wrote the row.
    instance       text        NOT NULL
);

-- The runbook query: one provider, newest first.
CREATE INDEX api_call_logs_provider_created_at ON api_call_logs (provider, created_at DESC);
-- Failures only: small, and what incident reports and `exwatch logs --failures` read.
CREATE INDEX api_call_logs_failures ON api_call_logs (provider, created_at DESC) WHERE NOT success;
