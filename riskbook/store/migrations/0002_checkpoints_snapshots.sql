-- Where each processor has got to in the log (committed in the same transaction as the
-- events it emits), and state snapshots for cheap point-in-time rebuilds.

CREATE TABLE processor_checkpoints (
    name       text        PRIMARY KEY CHECK (length(name) BETWEEN 1 AND 200),
    position   bigint      NOT NULL DEFAULT 0,
    updated_at timestamptz NOT NULL DEFAULT clock_timestamp()
);

-- The seed's table, with the global position it covers (a state is "all events up to
-- this position"), and the business time the state is as of.
CREATE TABLE position_snapshots (
    snapshot_id uuid        PRIMARY KEY DEFAULT gen_random_uuid(),
    account_id  text        NOT NULL,
    sequence    bigint      NOT NULL,
    position    bigint      NOT NULL,
    snapshot_at timestamptz NOT NULL,
    state       jsonb       NOT NULL,
    created_at  timestamptz NOT NULL DEFAULT clock_timestamp()
);

CREATE INDEX idx_snapshots_account ON position_snapshots (account_id, snapshot_at DESC);
