-- The answers being written in WebChat conversations: the text so far of each (and the tool
-- rounds before it, in the `messages.tool_rounds` JSON form), saved about once a second
-- while it streams, so that a process killed mid-answer (kill -9, a power loss) loses at
-- most the last moment of it. One row per conversation (one answer at a time each); the row
-- goes in the transaction that stores the finished answer, and at the next start every row
-- left over becomes that conversation's stored answer (`partial`, or `error` when it had no
-- text yet) with the reason in `failure`. Channel conversations have none: their inbound
-- queue answers an interrupted message again after a restart.
-- Migrations are never edited once applied: change the schema by adding a new file.

CREATE TABLE answer_drafts (
    conversation_id INTEGER PRIMARY KEY REFERENCES conversations (id) ON DELETE CASCADE,
    content         TEXT    NOT NULL,
    tool_rounds     TEXT,
    tier            TEXT,
    provider        TEXT,
    model           TEXT,
    host            TEXT,
    left_machine    INTEGER NOT NULL DEFAULT 0 CHECK (left_machine IN (0, 1)),
    started_at      INTEGER NOT NULL,
    updated_at      INTEGER NOT NULL
);
