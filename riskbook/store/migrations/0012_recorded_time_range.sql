-- A recorded time riskbook cannot write: before year 1, after year 9999 or infinite.
--
-- The hash chain's canonical encoding writes the recorded time with to_char's YYYY,
-- which has no era, and an infinite time as null: 2026-03-01 BC hashes as 2026-03-01 AD,
-- so a time moved to another era keeps its hash (riskbook verify reports every time
-- outside the years 1 to 9999 UTC instead), and readers cannot read such a time at all.
-- riskbook's writers (Python datetimes, clock_timestamp()) only write times within
-- those years; this keeps raw-SQL writers to them too.
--
-- NOT VALID: the rows already stored are not scanned (a large store upgrades at once,
-- and one holding such a time still upgrades: riskbook verify names it); every row
-- inserted from now on is checked. The infinities are outside the range too.
ALTER TABLE events ADD CONSTRAINT events_timestamp_in_range CHECK (
    "timestamp" >= '0001-01-01 00:00:00+00'::timestamptz
    AND "timestamp" < '10000-01-01 00:00:00+00'::timestamptz
) NOT VALID;

COMMENT ON CONSTRAINT events_timestamp_in_range ON events IS
    'recorded time within the years 1 to 9999 UTC, as riskbook writes it (the hash''s encoding has no era); riskbook verify reports older rows outside it';
