-- Tamper evidence: every event carries a hash chained to the previous event of its
-- aggregate, so that history altered, removed or reordered behind the append-only
-- triggers (by a superuser who disabled them, say) shows: `riskbook verify`.
--
-- The definition (riskbook.events.canonical_fields has it in full):
--   canonical(e) = UTF-8 of jsonb_build_array(event_id::text, event_type, aggregate_id,
--                  aggregate_type, sequence, <timestamp in UTC as YYYY-MM-DDTHH:MM:SS.ffffffZ>,
--                  causation_id::text, correlation_id, metadata, payload)::text
--   digest(e)    = sha256(canonical(e))
--   hash(e)      = sha256(hash(previous event of the aggregate) || digest(e)),
--                  with an empty previous hash for sequence 1.
--
-- Writers compute it at insert (the store's append, import and copy paths: in SQL with
-- riskbook_chain, or in Python for COPY); a row inserted without one (raw SQL, an older
-- riskbook) gets it from the trigger below.

-- Built-in functions only (sha256 needs no pgcrypto), so an auditor can recompute it in
-- psql; PARALLEL SAFE so that a verification scan can use parallel workers.
CREATE FUNCTION riskbook_event_digest(
    event_id uuid, event_type text, aggregate_id text, aggregate_type text, sequence bigint,
    recorded timestamptz, causation_id uuid, correlation_id text, metadata jsonb, payload jsonb
) RETURNS bytea
LANGUAGE sql STABLE PARALLEL SAFE AS $$
    SELECT sha256(convert_to(jsonb_build_array(
        event_id::text, event_type, aggregate_id, aggregate_type, sequence,
        to_char(recorded AT TIME ZONE 'UTC', 'YYYY-MM-DD"T"HH24:MI:SS.US"Z"'),
        causation_id::text, correlation_id, metadata, payload)::text, 'UTF8'))
$$;

COMMENT ON FUNCTION riskbook_event_digest(uuid, text, text, text, bigint, timestamptz, uuid, text, jsonb, jsonb) IS
    'sha256 of an event''s canonical encoding (see riskbook.events.canonical_fields)';

-- The chain as an aggregate: riskbook_chain(previous_hash, digest) OVER (PARTITION BY
-- aggregate_id ORDER BY sequence) gives each event its hash; previous_hash is the hash
-- of the event before the first one of the window (empty for a new aggregate).
CREATE FUNCTION riskbook_chain_step(state bytea, previous bytea, digest bytea) RETURNS bytea
LANGUAGE sql IMMUTABLE PARALLEL SAFE AS $$
    SELECT sha256(coalesce(state, previous) || digest)
$$;

CREATE AGGREGATE riskbook_chain(bytea, bytea) (
    SFUNC = riskbook_chain_step,
    STYPE = bytea,
    PARALLEL = SAFE
);

ALTER TABLE events ADD COLUMN hash bytea;

-- Upgrade in place: chain the events already stored. UPDATE on events is refused by
-- the append-only trigger; this migration is the one writer allowed to set the column.
-- An UPDATE checks every row against the table's CHECKs, NOT VALID ones included: the
-- aggregate-type rule of 0008 is set aside meanwhile, so that old rows written otherwise
-- (which 0008 lets stay) do not stop the upgrade, and put back as it was after.
ALTER TABLE events DISABLE TRIGGER events_append_only;
CREATE TEMP TABLE riskbook_0009_check ON COMMIT DROP AS
SELECT pg_get_constraintdef(oid) AS def FROM pg_constraint  -- "... NOT VALID" if so
 WHERE conrelid = 'events'::regclass AND conname = 'events_aggregate_type_matches';
ALTER TABLE events DROP CONSTRAINT IF EXISTS events_aggregate_type_matches;
UPDATE events e
   SET hash = c.hash
  FROM (SELECT position,
               riskbook_chain('\x'::bytea, riskbook_event_digest(
                   event_id, event_type, aggregate_id, aggregate_type, sequence, "timestamp",
                   causation_id, correlation_id, metadata, payload))
                   OVER (PARTITION BY aggregate_id ORDER BY sequence) AS hash
          FROM events) c
 WHERE e.position = c.position;
ALTER TABLE events ENABLE TRIGGER events_append_only;
DO $$
DECLARE c record;
BEGIN
    FOR c IN SELECT def FROM riskbook_0009_check LOOP
        EXECUTE 'ALTER TABLE events ADD CONSTRAINT events_aggregate_type_matches ' || c.def;
    END LOOP;
END $$;

ALTER TABLE events ALTER COLUMN hash SET NOT NULL;
ALTER TABLE events ADD CONSTRAINT events_hash_length CHECK (octet_length(hash) = 32);

COMMENT ON COLUMN events.hash IS
    'sha256(hash of the aggregate''s previous event || riskbook_event_digest(this event)); riskbook verify recomputes it';

-- A row inserted without a hash (raw SQL, a riskbook older than this schema) gets it
-- here, chained to the stored event before it. The WHEN clause keeps the store's own
-- writers, which always give the hash, off this per-row path.
CREATE FUNCTION riskbook_chain_event() RETURNS trigger
LANGUAGE plpgsql AS $$
DECLARE
    previous bytea;
BEGIN
    SELECT e.hash INTO previous
      FROM events e
     WHERE e.aggregate_id = NEW.aggregate_id AND e.sequence = NEW.sequence - 1;
    NEW.hash := sha256(coalesce(previous, '\x'::bytea) || riskbook_event_digest(
        NEW.event_id, NEW.event_type, NEW.aggregate_id, NEW.aggregate_type, NEW.sequence,
        NEW."timestamp", NEW.causation_id, NEW.correlation_id, NEW.metadata, NEW.payload));
    RETURN NEW;
END $$;

CREATE TRIGGER events_chained BEFORE INSERT ON events
    FOR EACH ROW WHEN (NEW.hash IS NULL) EXECUTE FUNCTION riskbook_chain_event();
