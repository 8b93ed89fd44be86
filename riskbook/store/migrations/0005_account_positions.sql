-- The seed article's account_positions read model, corrected (DESIGN.md §8), for
-- consumers outside Python (BI tools, SQL users). One row per (account, symbol) that
-- was ever traded or adjusted, from event_fields (typed columns, no JSON parsing):
--
--  * busted trades are excluded: a TradeExecuted with a TradeCancelled of the same
--    (account_id, trade_id) never happened;
--  * net_quantity is the position riskbook.projections computes: the new_quantity of
--    the last PositionUpdated (splits, reconciliations), if any, plus the signed
--    quantities of the live trades after it, in the order of DESIGN.md §4 (business
--    time, recorded time, position); rows whose position is back to 0 are kept;
--  * no average price: the article averaged prices without weights. The average cost
--    depends on the order of fills (riskbook.positions computes it); here only
--    volume-weighted prices per side, which are order-free: buy_vwap, sell_vwap;
--  * trade_count counts live fills; last_trade_at is business time (executed_at),
--    last_recorded_at the store's recorded time of the latest of them.
--
-- A unique index on (account_id, symbol) lets `REFRESH MATERIALIZED VIEW CONCURRENTLY`
-- (riskbook db refresh) run without blocking readers. It reflects everything stored
-- at its last refresh, busts included.

-- PostgreSQL keeps no statistics on the number of distinct (account_id, symbol) pairs
-- and would plan a sort for the GROUP BY; this tells it there are few (a hash).
CREATE STATISTICS event_fields_account_symbol (ndistinct) ON account_id, symbol FROM event_fields;

CREATE MATERIALIZED VIEW account_positions AS
WITH busts AS (
    SELECT DISTINCT account_id, trade_id
      FROM event_fields
     WHERE event_type = 'TradeCancelled'
),
live AS (
    SELECT t.account_id, t.symbol, t.occurred_at, t."timestamp", t.position, t.quantity,
           t.price, CASE WHEN t.side = 'Buy' THEN t.quantity ELSE -t.quantity END AS signed
      FROM event_fields t
     WHERE t.event_type = 'TradeExecuted'
       AND NOT EXISTS (SELECT 1 FROM busts b
                        WHERE b.account_id = t.account_id AND b.trade_id = t.trade_id)
),
last_adjustment AS (
    SELECT DISTINCT ON (account_id, symbol)
           account_id, symbol, new_quantity, occurred_at, "timestamp", position
      FROM event_fields
     WHERE event_type = 'PositionUpdated'
     ORDER BY account_id, symbol, occurred_at DESC, "timestamp" DESC, position DESC
),
fills AS (
    SELECT l.account_id, l.symbol,
           sum(l.signed) FILTER (
               WHERE a.account_id IS NULL
                  OR (l.occurred_at, l."timestamp", l.position)
                     > (a.occurred_at, a."timestamp", a.position)
           ) AS signed_since_adjustment,
           count(*) AS trade_count,
           sum(l.quantity) FILTER (WHERE l.signed > 0) AS bought_quantity,
           sum(l.quantity) FILTER (WHERE l.signed < 0) AS sold_quantity,
           sum(l.quantity * l.price) FILTER (WHERE l.signed > 0)
               / sum(l.quantity) FILTER (WHERE l.signed > 0) AS buy_vwap,
           sum(l.quantity * l.price) FILTER (WHERE l.signed < 0)
               / sum(l.quantity) FILTER (WHERE l.signed < 0) AS sell_vwap,
           max(l.occurred_at) AS last_trade_at,
           max(l."timestamp") AS last_recorded_at
      FROM live l
      LEFT JOIN last_adjustment a USING (account_id, symbol)
     GROUP BY l.account_id, l.symbol
)
SELECT account_id,
       symbol,
       coalesce(a.new_quantity, 0) + coalesce(f.signed_since_adjustment, 0) AS net_quantity,
       coalesce(f.trade_count, 0) AS trade_count,
       coalesce(f.bought_quantity, 0) AS bought_quantity,
       coalesce(f.sold_quantity, 0) AS sold_quantity,
       f.buy_vwap,
       f.sell_vwap,
       f.last_trade_at,
       f.last_recorded_at,
       a.occurred_at AS last_adjusted_at
  FROM fills f
  FULL JOIN last_adjustment a USING (account_id, symbol);

CREATE UNIQUE INDEX account_positions_key ON account_positions (account_id, symbol);

COMMENT ON MATERIALIZED VIEW account_positions IS
    'net quantity, fills and volume-weighted prices per (account, symbol), busts excluded; refresh with riskbook db refresh';
