-- The identity of this store: a random id made once, when the schema is created. Caches
-- of loaded history are keyed by it, so a different or re-created database is never
-- mistaken for this one (a copy made with pg_dump keeps it, and its history with it).

CREATE TABLE riskbook_store (
    store_id   uuid        NOT NULL DEFAULT gen_random_uuid(),
    created_at timestamptz NOT NULL DEFAULT clock_timestamp(),
    singleton  boolean     NOT NULL DEFAULT true PRIMARY KEY CHECK (singleton)
);

INSERT INTO riskbook_store DEFAULT VALUES;
