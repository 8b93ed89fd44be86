-- A trade id names one fill of its account (found by an auditor's hunt). A bust cancels
-- its trade by (account_id, trade_id): a fill booked again under a busted id, or two
-- fills sharing an id, vanished with the bust without a word. The typed copy now keeps
-- one TradeExecuted per (account_id, trade_id); a corrected fill needs an id of its own.
--
-- A store that holds such twins already keeps them (and riskbook's figures treat a
-- bust as cancelling every fill of its id): the index is made only where there are none,
-- and the upgrade says so otherwise.

DO $$
DECLARE
    twin record;
BEGIN
    SELECT account_id, trade_id INTO twin
      FROM event_fields
     WHERE event_type = 'TradeExecuted'
     GROUP BY account_id, trade_id
    HAVING count(*) > 1
     LIMIT 1;
    IF FOUND THEN
        RAISE WARNING 'trade id % of account % names more than one fill: trade ids '
                      'are not made unique in this store', twin.trade_id, twin.account_id;
    ELSE
        CREATE UNIQUE INDEX event_fields_trade_key ON event_fields (account_id, trade_id)
         WHERE event_type = 'TradeExecuted';
    END IF;
END $$;
