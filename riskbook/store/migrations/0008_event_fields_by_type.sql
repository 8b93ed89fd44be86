-- riskbook.load reads each event kind with its own narrow query (only the columns that
-- kind has): this index finds the rows of a kind, in global order, without scanning the
-- rows of the others.

CREATE INDEX event_fields_type_idx ON event_fields (event_type, position);

-- Every known event type belongs to one kind of aggregate (the store's writers check it;
-- now the database does too), so a load need not read aggregate_type row by row.
ALTER TABLE events ADD CONSTRAINT events_aggregate_type_matches CHECK (
    aggregate_type = CASE
        WHEN event_type = 'PriceMarked' THEN 'Instrument'
        WHEN event_type IN ('TradeExecuted', 'TradeCancelled', 'PositionUpdated', 'AccountFunded',
                            'LimitSet', 'LimitViolationDetected', 'AccountBlocked',
                            'AccountUnblocked') THEN 'Account'
        ELSE aggregate_type
    END
) NOT VALID;  -- new rows only: a store holding old rows written otherwise (by raw SQL, as
              -- the seed article's writer does for marks) must still upgrade
