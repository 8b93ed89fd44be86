-- What the database refuses, sharpened (each found by a bug hunt):
--
-- * A payload is a JSON object with a "type" (the serde layout). A payload of another
--   JSON kind, or an object without "type", passed the check of 0001 (payload->>'type'
--   is NULL there, and a NULL check passes); the first made every reader crash. Readers
--   now cope with such old rows; new ones are refused.
-- * A known event type whose fields break the catalogue's rules (DESIGN.md §2: side Buy or
--   Sell, quantity and price > 0, a mark's price > 0, an amount other than 0, a limit
--   value >= 0) is refused: the typed copy checks what riskbook.events checks before it
--   writes, so raw SQL can no longer store what riskbook.load would take for a trade of
--   -5 while riskbook.read keeps it raw.
-- * The recorded time is the server's. A session whose login role does not own events
--   (the processor's role, a raw SQL writer) cannot store a "timestamp" outside its own
--   transaction's clock (from the transaction's start to the end of the statement), so it
--   cannot back-date what the engine knew. The owner keeps given times: an import of
--   history does.
--
-- The constraints are NOT VALID: rows already stored are neither scanned nor refused.

ALTER TABLE events
    ADD CONSTRAINT events_payload_is_object
        CHECK (jsonb_typeof(payload) = 'object' AND payload ? 'type') NOT VALID;

ALTER TABLE event_fields
    ADD CONSTRAINT event_fields_side_known
        CHECK (side IN ('Buy', 'Sell')) NOT VALID,
    ADD CONSTRAINT event_fields_trade_positive
        CHECK (event_type <> 'TradeExecuted' OR coalesce(quantity > 0 AND price > 0, false)) NOT VALID,
    ADD CONSTRAINT event_fields_mark_positive
        CHECK (event_type <> 'PriceMarked' OR coalesce(price > 0, false)) NOT VALID,
    ADD CONSTRAINT event_fields_amount_not_zero
        CHECK (event_type <> 'AccountFunded' OR coalesce(amount <> 0, false)) NOT VALID,
    ADD CONSTRAINT event_fields_limit_not_negative
        CHECK (event_type <> 'LimitSet' OR coalesce(value >= 0, false)) NOT VALID;

CREATE OR REPLACE FUNCTION riskbook_events_inserted() RETURNS trigger
LANGUAGE plpgsql SECURITY DEFINER SET search_path FROM CURRENT AS $$
DECLARE
    lo bigint;
    top bigint;
    foreign_rows bigint;
    off_clock bigint;
BEGIN
    SELECT min(position), max(position),
           count(*) FILTER (WHERE position >> 28 <> pg_current_xact_id()::text::bigint),
           count(*) FILTER (WHERE "timestamp" < transaction_timestamp()
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
