-- Notifications not yet delivered, one row per sink target, in the order they were made (seq). A row is deleted
-- once delivered, rejected by the receiver or expired. Times are Unix milliseconds.
CREATE TABLE alert_outbox (
    seq           bigserial PRIMARY KEY,
    id            text      NOT NULL UNIQUE,
    -- The replica that made it: each replica delivers its own notifications.
    instance      text      NOT NULL,
    target        text      NOT NULL,
    kind          text      NOT NULL,
    -- The alert (labels, annotations, startsAt, endsAt) as JSON.
    payload       text      NOT NULL,
    created_at_ms bigint    NOT NULL
);

CREATE INDEX alert_outbox_instance_seq ON alert_outbox (instance, seq);

-- The alerts firing now, per replica, so that a restart neither pages again nor forgets to resolve.
CREATE TABLE alert_state (
    instance      text   NOT NULL,
    exchange      text   NOT NULL,
    alertname     text   NOT NULL,
    payload       text   NOT NULL,
    updated_at_ms bigint NOT NULL,
    PRIMARY KEY (instance, exchange, alertname)
);
