-- Typed columns of every event, kept beside the log so that loading history into Polars
-- reads plain columns instead of parsing JSONB (riskbook.frames).
--
-- event_fields holds one row per event: the envelope (without metadata and payload) and
-- the payload's fields as typed columns; a field an event type does not have is NULL.
-- It is derived data: filled by the insert trigger of events in the same transaction
-- (so it has the same positions and the same visibility fence), append-only like events.
-- For event types riskbook does not know, only the envelope columns are filled.
-- A known event type whose payload does not fit its types is refused by the database.

CREATE TABLE event_fields (
    position          bigint      NOT NULL PRIMARY KEY,
    event_id          uuid        NOT NULL,
    event_type        text        NOT NULL,
    aggregate_id      text        NOT NULL,
    aggregate_type    text        NOT NULL,
    sequence          bigint      NOT NULL,
    "timestamp"       timestamptz NOT NULL,
    causation_id      uuid,
    correlation_id    text        NOT NULL,
    occurred_at       timestamptz,          -- business time: the payload's *_at field
    account_id        text,
    symbol            text,
    trade_id          text,
    side              text,
    quantity          float8,
    price             float8,
    amount            float8,
    previous_quantity float8,
    new_quantity      float8,
    limit_type        text,
    value             float8,
    current_value     float8,
    limit_value       float8,
    actor             text,                 -- set_by, blocked_by or unblocked_by
    reason            text
);

COMMENT ON TABLE event_fields IS 'typed copy of every event''s fields, for fast loads; derived from events';

CREATE FUNCTION riskbook_time_field(event_type text) RETURNS text
LANGUAGE sql IMMUTABLE PARALLEL SAFE AS $$
    SELECT CASE event_type
        WHEN 'TradeExecuted' THEN 'executed_at'
        WHEN 'TradeCancelled' THEN 'cancelled_at'
        WHEN 'PositionUpdated' THEN 'updated_at'
        WHEN 'PriceMarked' THEN 'marked_at'
        WHEN 'AccountFunded' THEN 'funded_at'
        WHEN 'LimitSet' THEN 'set_at'
        WHEN 'LimitViolationDetected' THEN 'detected_at'
        WHEN 'AccountBlocked' THEN 'blocked_at'
        WHEN 'AccountUnblocked' THEN 'unblocked_at'
    END
$$;

-- The one place that maps payload JSON to typed columns (used by the trigger, the
-- backfill below and the bulk import).
CREATE FUNCTION riskbook_fill_event_fields(lo bigint, hi bigint) RETURNS bigint
LANGUAGE plpgsql AS $$
DECLARE
    n bigint;
BEGIN
    INSERT INTO event_fields
    SELECT e.position, e.event_id, e.event_type, e.aggregate_id, e.aggregate_type, e.sequence,
           e."timestamp", e.causation_id, e.correlation_id,
           (e.payload->>riskbook_time_field(e.event_type))::timestamptz,
           k.payload->>'account_id', k.payload->>'symbol', k.payload->>'trade_id',
           k.payload->>'side', (k.payload->>'quantity')::float8, (k.payload->>'price')::float8,
           (k.payload->>'amount')::float8, (k.payload->>'previous_quantity')::float8,
           (k.payload->>'new_quantity')::float8, k.payload->>'limit_type',
           (k.payload->>'value')::float8, (k.payload->>'current_value')::float8,
           (k.payload->>'limit_value')::float8,
           coalesce(k.payload->>'set_by', k.payload->>'blocked_by', k.payload->>'unblocked_by'),
           k.payload->>'reason'
      FROM events e
      -- only known types are read field by field; others keep just their envelope
      CROSS JOIN LATERAL (
          SELECT CASE WHEN riskbook_time_field(e.event_type) IS NOT NULL THEN e.payload END AS payload
      ) k
     WHERE e.position BETWEEN lo AND hi;
    GET DIAGNOSTICS n = ROW_COUNT;
    RETURN n;
END $$;

-- The insert trigger of events now also fills event_fields, from the rows just inserted.
CREATE OR REPLACE FUNCTION riskbook_events_inserted() RETURNS trigger
LANGUAGE plpgsql AS $$
DECLARE
    lo bigint;
    top bigint;
    foreign_rows bigint;
BEGIN
    SELECT min(position), max(position),
           count(*) FILTER (WHERE position >> 28 <> pg_current_xact_id()::text::bigint)
      INTO lo, top, foreign_rows
      FROM new_rows;
    IF foreign_rows > 0 THEN
        RAISE EXCEPTION '% inserted event(s) carry a position not reserved by this transaction', foreign_rows
            USING ERRCODE = 'RK002', HINT = 'leave position to its default, riskbook_next_position()';
    END IF;
    IF top IS NOT NULL THEN
        -- one statement's positions are one contiguous reservation: [lo, top] holds
        -- exactly the rows it inserted
        PERFORM riskbook_fill_event_fields(lo, top);
        PERFORM pg_notify('riskbook_events', top::text);
    END IF;
    RETURN NULL;
END $$;

CREATE OR REPLACE FUNCTION riskbook_refuse_change() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    RAISE EXCEPTION '% is append-only: % refused', TG_TABLE_NAME, TG_OP
        USING ERRCODE = 'RK001', HINT = 'correct history by appending a new event';
END $$;

CREATE TRIGGER event_fields_append_only BEFORE UPDATE OR DELETE ON event_fields
    FOR EACH ROW EXECUTE FUNCTION riskbook_refuse_change();
CREATE TRIGGER event_fields_no_truncate BEFORE TRUNCATE ON event_fields
    FOR EACH STATEMENT EXECUTE FUNCTION riskbook_refuse_change();

CREATE INDEX event_fields_timestamp_brin ON event_fields USING brin ("timestamp");

-- Upgrade in place: fill it for the events already stored.
SELECT riskbook_fill_event_fields(0, 9223372036854775807);
