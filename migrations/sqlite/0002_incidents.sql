-- One row per alert episode; the same columns as the Postgres schema, times as text like api_call_logs.created_at.
CREATE TABLE incidents (
    id           integer PRIMARY KEY AUTOINCREMENT,
    provider     text    NOT NULL,
    alertname    text    NOT NULL,
    scenario     text    NOT NULL,
    started_at   text    NOT NULL,
    resolved_at  text,
    first_error  text,
    last_error   text,
    failed_calls integer NOT NULL DEFAULT 0,
    total_calls  integer NOT NULL DEFAULT 0
);

CREATE INDEX incidents_provider_started_at ON incidents (provider, started_at DESC);
CREATE UNIQUE INDEX incidents_one_open_per_alert ON incidents (provider, alertname) WHERE resolved_at IS NULL;
