-- Each part of an answer sent in several messages is recorded as soon as its channel accepted
-- it, before the next part is sent. Before, the parts were recorded once the whole answer had
-- gone out, so a failure at part k left no trace of parts 0..k-1, and the next try sent them
-- again. `part` orders the parts of one answer (0 is the first, whose id is also
-- `messages.external_id`); `sent_through` is where the part ends in the text as its channel
-- sent it (a byte offset in the channel's rendering of the answer), so that a later try sends
-- only what follows the last recorded part. Rows written before this migration belong to
-- answers that went out whole: they are numbered in the order they were written, with no end.
-- Migrations are never edited once applied: change the schema by adding a new file.

ALTER TABLE message_parts ADD COLUMN part INTEGER NOT NULL DEFAULT 0;
ALTER TABLE message_parts ADD COLUMN sent_through INTEGER;
UPDATE message_parts SET part = (
    SELECT COUNT(*) FROM message_parts AS earlier
    WHERE earlier.message_id = message_parts.message_id AND earlier.rowid < message_parts.rowid
);
-- The new index also serves what the old one did (an answer's parts, the delete cascade).
DROP INDEX message_parts_by_message;
CREATE UNIQUE INDEX message_parts_in_order ON message_parts (message_id, part);
