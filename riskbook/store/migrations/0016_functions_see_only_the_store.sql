-- What the append path trusts, sharpened (each found by a tamper hunt):
--
-- * A function's search_path that does not name pg_temp has it searched FIRST for
--   tables and types. The insert trigger of events runs with the owner's rights
--   (0010), and it and the functions it runs named events and event_fields
--   unqualified, so a role that may append (the processor's) could shadow them with
--   TEMP tables of its own: a temporary `events` made the trigger fill the typed copy
--   that riskbook.load reads from forged rows, and a temporary `event_fields`
--   swallowed the typed copy and with it every check of 0013 and 0014 (a trade of -5
--   was stored). Every riskbook function that runs with the owner's rights, that a
--   trigger runs, or that such a function runs and that names a table, now searches
--   the store's schema and then pg_temp, last: nothing temporary stands in for the
--   store's tables (pg_catalog is searched first, as always). The SQL helpers that
--   name no table (riskbook_time_field, riskbook_event_digest, ...) keep no setting:
--   a setting would stop the planner inlining them into every append.
--
-- * The recorded time of a role that does not own events was bounded below by its
--   transaction's start. A transaction holds no transaction id (and so holds no reader
--   back) until it first writes: one opened, left idle, and then inserting with
--   "timestamp" = transaction_timestamp() back-dated its event by as long as it had
--   waited. The bound is now the start of the inserting statement (or of the
--   transaction, if later: a procedure that commits starts new ones). riskbook's
--   writers take each row's time from clock_timestamp() while inserting it, after the
--   statement began, so nothing they write is refused.

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

-- Migrations run with search_path set to the store's schema alone (riskbook/store/
-- migrations.py): current_schema() is the store's, whatever it is called.
DO $$
DECLARE
    f regprocedure;
BEGIN
    FOR f IN
        SELECT p.oid::regprocedure
          FROM pg_catalog.pg_proc p
          JOIN pg_catalog.pg_namespace n ON n.oid = p.pronamespace
         WHERE n.nspname = current_schema()
           AND p.proname LIKE 'riskbook\_%'
           AND p.prokind = 'f'
           AND (p.prosecdef
                OR p.prorettype = 'pg_catalog.trigger'::pg_catalog.regtype
                OR p.proname = 'riskbook_fill_event_fields')  -- run by the insert trigger
         ORDER BY 1
    LOOP
        EXECUTE format('ALTER FUNCTION %s SET search_path = %I, pg_temp', f, current_schema());
    END LOOP;
END $$;
