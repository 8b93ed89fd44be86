-- The visibility fence, sharpened: ignore transactions of other databases.
--
-- Version 1 fenced at the snapshot's xmin, the oldest transaction running anywhere in
-- the cluster, so a long transaction in another database (a bulk load, a benchmark)
-- held back every reader here until it ended. Now the fence is the oldest transaction
-- of the snapshot that could still commit events into this database: every running
-- transaction of the snapshot except those positively seen as belonging to a backend
-- of another database (a backend is bound to one database for life, so it cannot write
-- here). A transaction not found in pg_stat_activity (ended since the snapshot, a
-- prepared transaction, or hidden from this role) is kept: the fence only errs low.
-- xids in pg_stat_activity are 32-bit; the running ones span far less than 2^31, so
-- comparing the low 32 bits of the snapshot's xid8 values is exact.

CREATE OR REPLACE FUNCTION riskbook_position_fence() RETURNS bigint
LANGUAGE sql STABLE AS $$
    WITH snap AS (
        SELECT pg_current_snapshot() AS s
    ), foreign_xids AS (
        SELECT a.backend_xid::text::bigint AS x
          FROM pg_stat_activity a
         WHERE a.backend_xid IS NOT NULL
           AND a.datid IS NOT NULL
           AND a.datid <> (SELECT oid FROM pg_database WHERE datname = current_database())
    )
    SELECT least(
               pg_snapshot_xmax(snap.s)::text::bigint,
               (SELECT min(x::text::bigint)
                  FROM pg_snapshot_xip(snap.s) AS x
                 WHERE (x::text::bigint & 4294967295) NOT IN (SELECT f.x FROM foreign_xids f))
           ) << 28
      FROM snap
$$;

COMMENT ON FUNCTION riskbook_position_fence() IS
    'Every event with a position below this value is committed (or never will be): read up to it.';
