-- The same tables as the Postgres schema: undelivered notifications in order, and the alerts firing now.
CREATE TABLE alert_outbox (
    seq           integer PRIMARY KEY AUTOINCREMENT,
    id            text    NOT NULL UNIQUE,
    instance      text    NOT NULL,
    target        text    NOT NULL,
    kind          text    NOT NULL,
    payload       text    NOT NULL,
    created_at_ms integer NOT NULL
);

CREATE INDEX alert_outbox_instance_seq ON alert_outbox (instance, seq);

CREATE TABLE alert_state (
    instance      text    NOT NULL,
    exchange      text    NOT NULL,
    alertname     text    NOT NULL,
    payload       text    NOT NULL,
    updated_at_ms integer NOT NULL,
    PRIMARY KEY (instance, exchange, alertname)
);
