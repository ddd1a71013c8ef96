-- Every channel id of an answer sent in several parts (WhatsApp splits at 4,096 characters,
-- Talk at 32,000): `messages.external_id` keeps the first, and each part's id is here, so a
-- delivery report of any part reaches its answer. Before, reports of the later parts were
-- dropped, and a failed second part left the answer looking delivered.
-- Migrations are never edited once applied: change the schema by adding a new file.

CREATE TABLE message_parts (
    external_id TEXT    PRIMARY KEY,
    message_id  INTEGER NOT NULL REFERENCES messages (id) ON DELETE CASCADE
);
CREATE INDEX message_parts_by_message ON message_parts (message_id);
