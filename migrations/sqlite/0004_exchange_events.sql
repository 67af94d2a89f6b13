-- The same table as the Postgres schema: what happened to each exchange, for incident timelines.
CREATE TABLE exchange_events (
    id       text    PRIMARY KEY,
    instance text    NOT NULL,
    exchange text    NOT NULL,
    at_ms    integer NOT NULL,
    kind     text    NOT NULL,
    detail   text    NOT NULL
);

CREATE INDEX exchange_events_exchange_at ON exchange_events (exchange, at_ms);
