-- Inbound queue, version 2: conversations answered concurrently but in order, transient
-- failures retried later without holding the worker.
-- Migrations are never edited once applied: change the schema by adding a new file.

-- The channel's conversation (WhatsApp: the sender's number; Talk: the room token). Rows of
-- one conversation are answered in arrival order; different conversations run at once.
ALTER TABLE inbound_queue ADD COLUMN conversation_key TEXT;
-- A row put back after a transient failure (busy engine) is not claimed before this time
-- (Unix milliseconds).
ALTER TABLE inbound_queue ADD COLUMN next_attempt_at INTEGER;
-- How many claims ended in a transient failure; `attempts - retries` counts the claims a
-- stopped process interrupted.
ALTER TABLE inbound_queue ADD COLUMN retries INTEGER NOT NULL DEFAULT 0;

-- Rows still to answer get their conversation from the payload the channels wrote.
UPDATE inbound_queue
SET conversation_key = COALESCE(json_extract(payload, '$.from'), json_extract(payload, '$.token'))
WHERE status IN ('pending', 'processing') AND json_valid(payload);

CREATE INDEX inbound_queue_by_conversation ON inbound_queue (channel, conversation_key, id);
