-- Least privilege (riskbook db grant-reader / grant-processor, riskbook/store/roles.py).
--
-- event_fields is derived data that the insert trigger of events keeps. The trigger
-- now runs with the rights of the schema's owner, so a role allowed to append events
-- needs INSERT on events only, and cannot write event_fields rows of its own. Its body
-- derives rows only from the rows the statement itself inserted, and a trigger
-- function cannot be called directly. search_path is pinned to the one the schema was
-- created with.

ALTER FUNCTION riskbook_events_inserted() SECURITY DEFINER;
ALTER FUNCTION riskbook_events_inserted() SET search_path FROM CURRENT;
