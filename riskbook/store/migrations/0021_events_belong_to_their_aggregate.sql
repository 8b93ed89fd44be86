-- An event of a known type belongs to the aggregate its payload names (found by a roles
-- hunt). riskbook refuses an AccountFunded of account B appended to aggregate A
-- (InvalidEvent: "does not match the aggregate id"); the database stored it from any
-- role that may append (raw SQL), and riskbook.load then counted it for B, whose version
-- never moved, past B's optimistic concurrency. The typed copy now refuses it: an
-- account's events carry its id as account_id, an instrument's its symbol. Rows stored
-- before are kept (NOT VALID), as for the other rules of the catalogue (0013).

ALTER TABLE event_fields
    ADD CONSTRAINT event_fields_of_its_account
        CHECK (event_type NOT IN ('TradeExecuted', 'TradeCancelled', 'PositionUpdated',
                                  'AccountFunded', 'LimitSet', 'LimitViolationDetected',
                                  'AccountBlocked', 'AccountUnblocked')
               OR account_id = aggregate_id) NOT VALID,
    ADD CONSTRAINT event_fields_of_its_instrument
        CHECK (event_type <> 'PriceMarked' OR symbol = aggregate_id) NOT VALID;
