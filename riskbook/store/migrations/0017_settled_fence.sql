-- A fence for reads that come after it: read-your-writes with other databases busy.
--
-- riskbook_position_fence() holds back every transaction of its statement's snapshot
-- that it cannot positively place in another database through pg_stat_activity. That
-- view is read after the snapshot was taken: a transaction of another database that
-- ended in between is no longer listed there, so it is kept, and the fence falls below
-- events committed well before. riskbook.load and Store.read_all then missed an event
-- their caller had just appended, about once in a thousand reads with other databases
-- of the server busy.
--
-- A read made by statements that run after the fence's (what riskbook's readers now
-- do) sees whatever a transaction that has ended by then committed: such a transaction
-- need not hold the fence back. This fence tells them apart in this order:
--   1. pg_stat_activity, read afresh (pg_stat_clear_snapshot), after the snapshot: a
--      transaction of the snapshot listed under another database is left out; one
--      listed otherwise (this database, none) is kept: it is running.
--   2. then pg_xact_status() of each one not listed: a backend's transaction leaves
--      pg_stat_activity when it leaves the process array, after its commit or abort is
--      recorded, so one not listed in step 1 and no longer in progress in step 2 has
--      left the process array: every snapshot taken later sees its rows. One still in
--      progress (a prepared transaction, say) is kept.
-- The order matters: pg_xact_status() says "committed" as soon as the commit is
-- recorded, a moment before the transaction leaves the process array, so it is asked
-- only of transactions already gone from pg_stat_activity.
--
-- A statement that reads with the fence in its own snapshot (a hand-written query)
-- must keep using riskbook_position_fence(): in that snapshot a transaction that ended
-- since is still running, and its rows unseen. Only under READ COMMITTED do later
-- statements take later snapshots; under any other isolation level the transaction
-- keeps its first one, and this fence is riskbook_position_fence().

CREATE OR REPLACE FUNCTION riskbook_settled_fence() RETURNS bigint
LANGUAGE plpgsql STABLE AS $$
DECLARE
    snap pg_snapshot := pg_current_snapshot();
    here oid;
    elsewhere bigint[];
    listed bigint[];
    held bigint;
BEGIN
    IF current_setting('transaction_isolation') <> 'read committed' THEN
        RETURN riskbook_position_fence();
    END IF;
    PERFORM pg_stat_clear_snapshot();  -- pg_stat_activity is read once per transaction
    SELECT oid INTO here FROM pg_database WHERE datname = current_database();
    -- xids in pg_stat_activity are 32-bit; the running ones span far less than 2^31, so
    -- comparing the low 32 bits of the snapshot's xid8 values is exact
    SELECT coalesce(array_agg(a.backend_xid::text::bigint)
                        FILTER (WHERE a.datid IS NOT NULL AND a.datid <> here), '{}'),
           coalesce(array_agg(a.backend_xid::text::bigint)
                        FILTER (WHERE a.datid IS NULL OR a.datid = here), '{}')
      INTO elsewhere, listed
      FROM pg_stat_activity a
     WHERE a.backend_xid IS NOT NULL;
    SELECT min(x::text::bigint) INTO held
      FROM pg_snapshot_xip(snap) AS x
     WHERE NOT ((x::text::bigint & 4294967295) = ANY (elsewhere))
       AND ((x::text::bigint & 4294967295) = ANY (listed)
            OR coalesce(pg_xact_status(x), 'in progress') = 'in progress');
    RETURN least(pg_snapshot_xmax(snap)::text::bigint, held) << 28;
END
$$;

COMMENT ON FUNCTION riskbook_settled_fence() IS
    'For reads by later statements (READ COMMITTED): every event with a position below this'
    ' value is committed and visible to them (or never will be).';
