-- One row per alert episode: opened when an alert fires, updated while it lasts, resolved when it clears.
CREATE TABLE incidents (
    id           bigserial   PRIMARY KEY,
    provider     text        NOT NULL,
    alertname    text        NOT NULL,
    -- The runbook scenario diagnosed (maintenance, rate_limiting, authentication, network, unknown).
    scenario     text        NOT NULL,
    started_at   timestamptz NOT NULL,
    resolved_at  timestamptz,
    first_error  text,
    last_error   text,
    failed_calls bigint      NOT NULL DEFAULT 0,
    total_calls  bigint      NOT NULL DEFAULT 0
);

CREATE INDEX incidents_provider_started_at ON incidents (provider, started_at DESC);
-- At most one open incident per provider and alert, even with two replicas opening it at once.
CREATE UNIQUE INDEX incidents_one_open_per_alert ON incidents (provider, alertname) WHERE resolved_at IS NULL;
