-- What riskbook.projections.state_at needs to rebuild a state at any T from the nearest
-- snapshot plus the events after it, without reading the whole history.

-- A snapshot holds the state of one account after every event with business time <=
-- snapshot_at and position <= position, as it was known then: known_through is the
-- latest recorded time among those events (and the busts applied to them). A query
-- "as known at K" may start from it only if known_through <= K.
ALTER TABLE position_snapshots ADD COLUMN known_through timestamptz;
ALTER TABLE position_snapshots
    ADD CONSTRAINT position_snapshots_state_key UNIQUE (account_id, snapshot_at, position);

-- An account's events in a business-time window (and the list of accounts, by a loose
-- index scan).
CREATE INDEX event_fields_account_time_idx ON event_fields (account_id, occurred_at)
    WHERE account_id IS NOT NULL;
-- A symbol's marks in a business-time window, and its latest mark before a time.
CREATE INDEX event_fields_mark_time_idx ON event_fields (symbol, occurred_at)
    WHERE event_type = 'PriceMarked';
-- An account's busts (they apply whatever their business time).
CREATE INDEX event_fields_bust_idx ON event_fields (account_id)
    WHERE event_type = 'TradeCancelled';
