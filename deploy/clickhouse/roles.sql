-- ClickHouse roles for labloop on a server: `labloop roles` prints these, `labloop roles --apply` runs them.
-- The sink INSERT-only (SELECT for its offset read-back), analysts SELECT-only under a read-only
-- profile, the operator schema work, and no role may delete or rewrite raw or audit rows.
CREATE ROLE IF NOT EXISTS labloop_sink;
CREATE ROLE IF NOT EXISTS labloop_analyst;
CREATE ROLE IF NOT EXISTS labloop_operator;
CREATE SETTINGS PROFILE IF NOT EXISTS labloop_analyst SETTINGS readonly = 1, max_execution_time = 30, max_memory_usage = 4294967296 TO labloop_analyst;
GRANT INSERT, SELECT ON `labloop`.* TO labloop_sink;
GRANT SELECT ON `labloop`.* TO labloop_analyst;
GRANT SELECT, INSERT, CREATE TABLE, CREATE VIEW, DROP VIEW, ALTER ADD COLUMN, ALTER COMMENT COLUMN, ALTER MODIFY TTL ON `labloop`.* TO labloop_operator;
