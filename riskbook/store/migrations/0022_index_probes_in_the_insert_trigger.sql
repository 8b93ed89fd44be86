-- The insert trigger's two look-ups of events planned as index probes, whatever the
-- planner's view of the table.
--
-- The check of 0018 (no event ahead of every transaction this server has begun) asked
-- for any row with position >= a bound the planner cannot see, and the check of 0020
-- (an aggregate's versions keep their order) joined the statement's aggregates to
-- events. Planned with the statistics of a store that had just grown from empty (the
-- statistics lag until autovacuum analyzes the table), both read the whole table: a
-- 50-event append into a store of 10,000 events spent 7 ms and 4.5 ms in them (the
-- whole append: 12.7 ms instead of 7.8 ms before 0018), and more as the store grew.
-- Each is now the first row of an index range scan on position (two ranges around
-- this transaction's own rows); the second looks each aggregate's predecessor up (one
-- probe of the unique key (aggregate_id, sequence) each) only when a later transaction
-- has written at all, which a bulk write into an empty store (its secondary indexes
-- dropped while it holds the table alone) never meets. What they refuse is unchanged.

CREATE OR REPLACE FUNCTION riskbook_events_inserted() RETURNS trigger
LANGUAGE plpgsql SECURITY DEFINER AS $$
DECLARE
    lo bigint;
    top bigint;
    foreign_rows bigint;
    off_clock bigint;
    own bigint := pg_current_xact_id()::text::bigint;
BEGIN
    SELECT min(position), max(position),
           count(*) FILTER (WHERE position >> 28 <> own),
           count(*) FILTER (WHERE "timestamp" < greatest(statement_timestamp(), transaction_timestamp())
                               OR "timestamp" > clock_timestamp())
      INTO lo, top, foreign_rows, off_clock
      FROM new_rows;
    -- Every row this statement sees is of a transaction below its snapshot's xmax, or
    -- of this one: a row at or past xmax << 28 of another was written on another server
    -- (pg_dump and pg_restore copy positions, which are transaction ids of the server
    -- that wrote them). The events appended here would go below it, and readers, whose
    -- fence is made of this server's transaction ids, would never reach it.
    -- Two ranges of the index on position, around this transaction's own: each the
    -- first row of an index scan, whatever the planner thinks of the table's size. The
    -- bound is the snapshot of this very statement, which sees no row past it.
    IF (SELECT (SELECT position FROM events
                 WHERE position >= x.horizon AND position < own << 28
                 ORDER BY position LIMIT 1) IS NOT NULL
               OR (SELECT position FROM events
                    WHERE position >= greatest(x.horizon, (own + 1) << 28)
                    ORDER BY position LIMIT 1) IS NOT NULL
          FROM (SELECT pg_snapshot_xmax(pg_current_snapshot())::text::bigint << 28 AS horizon) x)
    THEN
        RAISE EXCEPTION 'the store holds events of positions ahead of every transaction this server has begun, so nothing appended here would come after them: it was copied from another server (pg_dump and pg_restore, say), or positions were altered (riskbook verify names the events)'
            USING ERRCODE = 'RK004', HINT = 'a copy: run `riskbook db renumber` once, as the owner of the store';
    END IF;
    IF foreign_rows > 0 THEN
        RAISE EXCEPTION '% inserted event(s) carry a position not reserved by this transaction', foreign_rows
            USING ERRCODE = 'RK002', HINT = 'leave position to its default, riskbook_next_position()';
    END IF;
    -- An aggregate's events keep their versions' order in the global one: a transaction
    -- whose id was taken before another's (by an earlier statement of it) and which
    -- appends to an aggregate that the other has appended to and committed since would
    -- put the next version below the previous one. One index probe per aggregate of the
    -- statement: its first new version's predecessor. A single-statement append never
    -- meets this (its id is taken after its snapshot, which sees the other's commit, or
    -- it collides with the other's version and is retried); the caller of a longer
    -- transaction retries it, with a later id (a serialization failure, 40001).
    -- Only an event of a later transaction (position from (own + 1) << 28 on) can be
    -- such a predecessor, and there is none in the common case: one probe of the index
    -- on position says so. Only then is each aggregate's predecessor looked up, one
    -- probe of (aggregate_id, sequence) each -- never without that index, which bulk
    -- writes into an empty store drop while they hold the table alone.
    IF (SELECT position FROM events
         WHERE position >= (own + 1) << 28
         ORDER BY position LIMIT 1) IS NOT NULL THEN
        IF EXISTS (
            SELECT 1
              FROM (SELECT aggregate_id, min(sequence) AS first_sequence,
                           min(position) AS first_position
                      FROM new_rows GROUP BY aggregate_id) n
             WHERE (SELECT e.position FROM events e
                     WHERE e.aggregate_id = n.aggregate_id AND e.sequence = n.first_sequence - 1)
                   > n.first_position
        ) THEN
            RAISE EXCEPTION 'an aggregate''s next version would come before its previous one in the global order: another transaction appended to it after this one began writing'
                USING ERRCODE = '40001', HINT = 'roll back and retry the transaction';
        END IF;
    END IF;
    -- session_user: who logged in (inside this SECURITY DEFINER function current_user is
    -- the owner); a superuser or the owner may SET ROLE and still import history
    IF off_clock > 0 AND NOT pg_has_role(
        session_user, (SELECT relowner FROM pg_catalog.pg_class WHERE oid = TG_RELID), 'MEMBER'
    ) THEN
        RAISE EXCEPTION '% inserted event(s) carry a recorded time ("timestamp") other than the server''s clock', off_clock
            USING ERRCODE = 'RK003',
                  HINT = 'leave "timestamp" to its default: only the owner of events may keep given recorded times (an import of history)';
    END IF;
    IF top IS NOT NULL THEN
        -- one statement's positions are one contiguous reservation: [lo, top] holds
        -- exactly the rows it inserted
        PERFORM riskbook_fill_event_fields(lo, top);
        PERFORM pg_notify('riskbook_events', top::text);
    END IF;
    RETURN NULL;
END $$;

-- CREATE OR REPLACE reset its settings: it searches the store's schema, then pg_temp
-- (0016; migrations run with search_path set to the store's schema alone).
DO $$
BEGIN
    EXECUTE format('ALTER FUNCTION riskbook_events_inserted() SET search_path = %I, pg_temp',
                   current_schema());
END $$;
