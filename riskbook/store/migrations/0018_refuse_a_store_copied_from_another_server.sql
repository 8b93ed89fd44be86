-- A store copied to another server (pg_dump and pg_restore) is refused until renumbered.
--
-- A position is (transaction id << 28) + n, and transaction ids are the server's own: a
-- copy restored on another server holds positions far ahead of the transaction ids there
-- (a fresh cluster starts near 750). Readers, whose fence is made of this server's ids,
-- saw none of its history (riskbook.load returned an empty History), and appends went
-- below it, out of global order (found by a point-in-time hunt). The insert trigger now
-- refuses to append to such a store, and riskbook's readers refuse to read it, both
-- saying what to do: `riskbook db renumber` (Store.renumber) gives its events positions
-- below every transaction of this server, in the same order.

CREATE OR REPLACE FUNCTION riskbook_events_inserted() RETURNS trigger
LANGUAGE plpgsql SECURITY DEFINER AS $$
DECLARE
    lo bigint;
    top bigint;
    foreign_rows bigint;
    off_clock bigint;
BEGIN
    SELECT min(position), max(position),
           count(*) FILTER (WHERE position >> 28 <> pg_current_xact_id()::text::bigint),
           count(*) FILTER (WHERE "timestamp" < greatest(statement_timestamp(), transaction_timestamp())
                               OR "timestamp" > clock_timestamp())
      INTO lo, top, foreign_rows, off_clock
      FROM new_rows;
    -- Every row this statement sees is of a transaction below its snapshot's xmax, or
    -- of this one: a row at or past xmax << 28 of another was written on another server
    -- (pg_dump and pg_restore copy positions, which are transaction ids of the server
    -- that wrote them). The events appended here would go below it, and readers, whose
    -- fence is made of this server's transaction ids, would never reach it.
    IF EXISTS (SELECT 1 FROM events
                WHERE position >= (pg_snapshot_xmax(pg_current_snapshot())::text::bigint << 28)
                  AND position >> 28 <> pg_current_xact_id()::text::bigint) THEN
        RAISE EXCEPTION 'the store holds events of positions ahead of every transaction this server has begun, so nothing appended here would come after them: it was copied from another server (pg_dump and pg_restore, say), or positions were altered (riskbook verify names the events)'
            USING ERRCODE = 'RK004', HINT = 'a copy: run `riskbook db renumber` once, as the owner of the store';
    END IF;
    IF foreign_rows > 0 THEN
        RAISE EXCEPTION '% inserted event(s) carry a position not reserved by this transaction', foreign_rows
            USING ERRCODE = 'RK002', HINT = 'leave position to its default, riskbook_next_position()';
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
