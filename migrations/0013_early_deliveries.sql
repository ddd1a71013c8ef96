-- WhatsApp delivery reports that arrive before the id they are about is recorded: Meta can
-- post a part's status webhook (`sent`, `delivered`, `read`, `failed`) before the answer to
-- our send request is back and the part's wamid is in `message_parts`. Before, such a report
-- found no message and was dropped, so an answer reported `failed` that way showed `sent`
-- for ever. Now it waits here and is applied, under the usual delivery rules, in the
-- transaction that records its id (`db::inbound::keep_early_delivery` and
-- `apply_early_deliveries`). A row holds only the channel's id of the message, the reported
-- state and Meta's error text: no message text, no phone number (`recipient_id` is not
-- kept). Rows are dropped once applied, after 24 hours, and beyond 10,000 rows (the oldest
-- first, `failed` ones last). One row per id and state: Meta repeats its reports.
--
-- `message_parts.reported_status` is the furthest state (`sent` < `delivered` < `read` <
-- `played`) such a report gave a part of an answer that was still going out when the part
-- was recorded: it may not move that answer yet (see `db::inbound::record_delivery`), and
-- is applied when the last part went out (`mark_sent`). It goes with its part, so deleting
-- a conversation leaves nothing behind.
-- Migrations are never edited once applied: change the schema by adding a new file.

CREATE TABLE early_deliveries (
    id          INTEGER PRIMARY KEY AUTOINCREMENT,
    external_id TEXT    NOT NULL,
    status      TEXT    NOT NULL,
    error       TEXT,
    received_at INTEGER NOT NULL,
    UNIQUE (external_id, status)
);
CREATE INDEX early_deliveries_by_age ON early_deliveries (received_at);

ALTER TABLE message_parts ADD COLUMN reported_status TEXT;
