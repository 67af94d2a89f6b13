-- What happened to each exchange, read back as an incident's timeline: breaker transitions, alerts fired,
-- re-diagnosed and resolved, deliveries per sink, rate-limit changes, recovery verification steps. Times are Unix
-- milliseconds; ids make a replayed write a no-op. Retention deletes them with the call logs.
CREATE TABLE exchange_events (
    id       text   PRIMARY KEY,
    instance text   NOT NULL,
    exchange text   NOT NULL,
    at_ms    bigint NOT NULL,
    kind     text   NOT NULL,
    detail   text   NOT NULL
);

CREATE INDEX exchange_events_exchange_at ON exchange_events (exchange, at_ms);
