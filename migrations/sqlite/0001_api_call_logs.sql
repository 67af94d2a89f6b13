-- Every exchange call exwatch makes, one row each; the same columns as the Postgres schema.
--
-- Types, because SQLite has few:
--   id          text, the hyphenated lowercase UUID.
--   success     0 or 1.
--   created_at  text 'YYYY-MM-DD HH:MM:SS.ffffffZ' in UTC: RFC 3339 with the space separator it allows, and a
--               fixed-width fraction. It sorts as time does and compares correctly with SQLite's own datetime(),
--               which writes 'YYYY-MM-DD HH:MM:SS', so the runbook query works in the same shape:
--   SELECT endpoint, success, response_time, error_message, created_at FROM api_call_logs
--   WHERE provider = 'kraken' AND created_at > datetime('now', '-30 minutes') ORDER BY created_at DESC LIMIT 50;
CREATE TABLE api_call_logs (
    id             text    PRIMARY KEY NOT NULL,
    provider       text    NOT NULL,
    endpoint       text    NOT NULL,
    success        boolean NOT NULL CHECK (success IN (0, 1)),
    response_time  integer NOT NULL,
    error_message  text,
    created_at     text    NOT NULL,
    http_status    integer,
    error_class    text,
    exchange_error text,
    instance       text    NOT NULL
);

CREATE INDEX api_call_logs_provider_created_at ON api_call_logs (provider, created_at DESC);
CREATE INDEX api_call_logs_failures ON api_call_logs (provider, created_at DESC) WHERE NOT success;
