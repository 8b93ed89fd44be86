-- The event log (DESIGN.md §3). Corrected from the seed article:
--  * sequence is the per-aggregate version, UNIQUE (aggregate_id, sequence), so optimistic
--    concurrency is enforced by this constraint, not by a read-then-insert check;
--  * position is the global reading order, assigned so that readers can follow it without
--    ever skipping an event that a slower transaction commits later (see below);
--  * events are append-only: UPDATE, DELETE and TRUNCATE are refused by triggers.
--
-- Positions. A position is (top-level transaction id << 28) + n, n = 1, 2, ... within the
-- transaction. Transaction ids are handed out in increasing order, so every event of a
-- transaction that is still running, or has not started yet, gets a position above
-- (xmin << 28), where xmin is the oldest transaction still running. A reader that reads
-- only positions below that fence (riskbook_position_fence()) reads a prefix of the log
-- that can no longer change: it never skips a late commit and never sees an event twice.

CREATE FUNCTION riskbook_reserve_positions(n bigint) RETURNS bigint
LANGUAGE plpgsql VOLATILE AS $$
DECLARE
    used bigint := coalesce(nullif(current_setting('riskbook.positions_used', true), ''), '0')::bigint;
BEGIN
    IF n < 0 OR used + n >= 268435456 THEN
        RAISE EXCEPTION 'a transaction can append at most 268435455 events (asked for % more after %)', n, used;
    END IF;
    PERFORM set_config('riskbook.positions_used', (used + n)::text, true);
    RETURN (pg_current_xact_id()::text::bigint << 28) + used + 1;
END $$;

COMMENT ON FUNCTION riskbook_reserve_positions(bigint) IS
    'Reserves n consecutive positions for events of the current transaction; returns the first.';

CREATE FUNCTION riskbook_next_position() RETURNS bigint
LANGUAGE sql VOLATILE AS $$ SELECT riskbook_reserve_positions(1) $$;

CREATE FUNCTION riskbook_position_fence() RETURNS bigint
LANGUAGE sql STABLE AS $$ SELECT pg_snapshot_xmin(pg_current_snapshot())::text::bigint << 28 $$;

COMMENT ON FUNCTION riskbook_position_fence() IS
    'Every event with a position below this value is committed (or never will be): read up to it.';

CREATE TABLE events (
    position       bigint      NOT NULL DEFAULT riskbook_next_position(),
    event_id       uuid        NOT NULL,
    event_type     text        NOT NULL CHECK (length(event_type) BETWEEN 1 AND 100),
    aggregate_id   text        NOT NULL CHECK (length(aggregate_id) BETWEEN 1 AND 256),
    aggregate_type text        NOT NULL CHECK (length(aggregate_type) BETWEEN 1 AND 50),
    sequence       bigint      NOT NULL CHECK (sequence >= 1),
    "timestamp"    timestamptz NOT NULL DEFAULT clock_timestamp(),
    causation_id   uuid,
    correlation_id text        NOT NULL CHECK (length(correlation_id) <= 256),
    metadata       jsonb       NOT NULL DEFAULT '{}' CHECK (jsonb_typeof(metadata) = 'object'),
    payload        jsonb       NOT NULL CHECK (payload->>'type' = event_type),
    CONSTRAINT events_pkey PRIMARY KEY (position),
    CONSTRAINT events_event_id_key UNIQUE (event_id),
    CONSTRAINT events_aggregate_sequence_key UNIQUE (aggregate_id, sequence)
);

COMMENT ON COLUMN events.sequence IS 'the aggregate''s version after this event: 1, 2, 3, ... with no gaps';
COMMENT ON COLUMN events.position IS 'global reading order; read only below riskbook_position_fence()';
COMMENT ON COLUMN events."timestamp" IS 'recorded time: when the store learned the event';

-- The article's indexes where they still serve: causation chains (auditors walk them) and
-- correlation groups. The GIN index on metadata served no reader and slowed every write.
CREATE INDEX events_causation_idx ON events (causation_id) WHERE causation_id IS NOT NULL;
CREATE INDEX events_correlation_idx ON events (correlation_id);
-- Recorded time grows with position, so a BRIN index serves known_at filters for a few pages.
CREATE INDEX events_timestamp_brin ON events USING brin ("timestamp");

CREATE FUNCTION riskbook_refuse_change() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    RAISE EXCEPTION 'events are append-only: % on events is refused', TG_OP
        USING ERRCODE = 'RK001', HINT = 'correct history by appending a new event';
END $$;

CREATE TRIGGER events_append_only BEFORE UPDATE OR DELETE ON events
    FOR EACH ROW EXECUTE FUNCTION riskbook_refuse_change();
CREATE TRIGGER events_no_truncate BEFORE TRUNCATE ON events
    FOR EACH STATEMENT EXECUTE FUNCTION riskbook_refuse_change();

-- After each insert statement: check that the positions came from this transaction's
-- reservation (so the fence holds for raw SQL too), then wake followers. NOTIFY is
-- delivered at commit, with the highest new position as payload.
CREATE FUNCTION riskbook_events_inserted() RETURNS trigger
LANGUAGE plpgsql AS $$
DECLARE
    top bigint;
    foreign_rows bigint;
BEGIN
    SELECT max(position),
           count(*) FILTER (WHERE position >> 28 <> pg_current_xact_id()::text::bigint)
      INTO top, foreign_rows
      FROM new_rows;
    IF foreign_rows > 0 THEN
        RAISE EXCEPTION '% inserted event(s) carry a position not reserved by this transaction', foreign_rows
            USING ERRCODE = 'RK002', HINT = 'leave position to its default, riskbook_next_position()';
    END IF;
    IF top IS NOT NULL THEN
        PERFORM pg_notify('riskbook_events', top::text);
    END IF;
    RETURN NULL;
END $$;

CREATE TRIGGER events_inserted AFTER INSERT ON events
    REFERENCING NEW TABLE AS new_rows
    FOR EACH STATEMENT EXECUTE FUNCTION riskbook_events_inserted();
