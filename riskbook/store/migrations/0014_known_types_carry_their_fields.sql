-- A known event type carries every field its readers need (found by a bug hunt): 0013
-- checked the values it constrains, but a trade with no "symbol" (or no account, time,
-- side, ...) was stored, riskbook.read kept it raw, and riskbook.load handed a null
-- symbol to the fold, which crashed the process. The typed copy now refuses a known
-- event without one of its required fields (riskbook.events: the fields without a
-- default; the actor column is set_by, blocked_by or unblocked_by).
--
-- NOT VALID, as 0013: rows already stored are neither scanned nor refused (load sets
-- them aside with a warning, as read keeps them raw).

ALTER TABLE event_fields
    ADD CONSTRAINT event_fields_known_types_complete CHECK (
        CASE event_type
            WHEN 'TradeExecuted' THEN num_nulls(account_id, symbol, trade_id, side, quantity,
                                                price, occurred_at) = 0
            WHEN 'TradeCancelled' THEN num_nulls(account_id, trade_id, reason, occurred_at) = 0
            WHEN 'PositionUpdated' THEN num_nulls(account_id, symbol, previous_quantity,
                                                  new_quantity, reason, occurred_at) = 0
            WHEN 'PriceMarked' THEN num_nulls(symbol, price, occurred_at) = 0
            WHEN 'AccountFunded' THEN num_nulls(account_id, amount, occurred_at) = 0
            WHEN 'LimitSet' THEN num_nulls(account_id, limit_type, value, actor, occurred_at) = 0
            WHEN 'LimitViolationDetected' THEN num_nulls(account_id, limit_type, current_value,
                                                         limit_value, occurred_at) = 0
            WHEN 'AccountBlocked' THEN num_nulls(account_id, reason, actor, occurred_at) = 0
            WHEN 'AccountUnblocked' THEN num_nulls(account_id, reason, actor, occurred_at) = 0
            ELSE true
        END
    ) NOT VALID;
