-- account_positions: a position closed by fills of binary fractions is 0, not dust.
--
-- Its net_quantity was a plain float8 sum: Buy 0.1, Buy 0.2, Sell 0.3 left
-- 5.551115123125783e-17, an open position of dust to every SQL consumer (WHERE
-- net_quantity <> 0), where riskbook.projections settles the position to exactly 0
-- (found by an exposure hunt). The quantities are now summed as numeric, each float8
-- as its shortest exact decimal (its text, since PostgreSQL 12), so fills that cancel as
-- written cancel exactly; the sum is then a float8 again. A materialized view's query
-- cannot be altered: it is made again, with its index, comment and the privileges
-- granted on it (riskbook db grant-reader), and filled.

CREATE TEMP TABLE riskbook_view_grants ON COMMIT DROP AS
    SELECT a.grantee, a.privilege_type
      FROM pg_catalog.pg_class c, pg_catalog.aclexplode(c.relacl) a
     WHERE c.oid = 'account_positions'::regclass AND a.grantee <> c.relowner;

DROP MATERIALIZED VIEW account_positions;

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
           sum(l.signed::text::numeric) FILTER (
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
       (coalesce(a.new_quantity::text::numeric, 0) + coalesce(f.signed_since_adjustment, 0))::float8
           AS net_quantity,
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

DO $$
DECLARE
    g record;
BEGIN
    FOR g IN SELECT grantee, privilege_type FROM riskbook_view_grants LOOP
        EXECUTE format('GRANT %s ON account_positions TO %s', g.privilege_type,
                       CASE WHEN g.grantee = 0 THEN 'PUBLIC'
                            ELSE quote_ident(pg_catalog.pg_get_userbyid(g.grantee)) END);
    END LOOP;
END $$;
