-- Ids that are never given out twice: conversations, messages and scheduled jobs become
-- AUTOINCREMENT tables. A plain INTEGER PRIMARY KEY hands out one more than the largest id
-- present, so deleting the newest conversation gave its id to the next one: a job, a
-- browser tab or a delivery report that still named the old id then wrote into, or read,
-- an unrelated conversation.
-- Migrations are never edited once applied: change the schema by adding a new file.
--
-- SQLite cannot add AUTOINCREMENT to a table, so the four tables of the foreign-key chain
-- (conversations <- messages, cron_jobs <- cron_runs) are rebuilt. This runs inside the
-- migrator's transaction, where foreign keys stay enforced, so the order matters:
-- 1. The old tables are renamed first; SQLite rewrites the references between them, so the
--    old chain stays whole and refers only to itself.
-- 2. The new tables are created under the real names and filled parents first, with the
--    same ids (the full-text index, keyed by message id, stays valid as it is).
-- 3. The old tables are dropped children first: a dropped table's rows are deleted before
--    it goes, and no row of the old chain is still referenced by then, so no cascade or
--    SET NULL reaches anything. Their indexes and triggers go with them and are made anew
--    on the new tables.

ALTER TABLE cron_runs RENAME TO cron_runs_old;
ALTER TABLE cron_jobs RENAME TO cron_jobs_old;
ALTER TABLE messages RENAME TO messages_old;
ALTER TABLE conversations RENAME TO conversations_old;

CREATE TABLE conversations (
    id            INTEGER PRIMARY KEY AUTOINCREMENT,
    -- webchat | whatsapp | nextcloud
    channel       TEXT    NOT NULL,
    -- The channel's own key: a phone number, a Talk room token, a WebChat id.
    external_key  TEXT    NOT NULL,
    title         TEXT,
    created_at    INTEGER NOT NULL,
    updated_at    INTEGER NOT NULL,
    UNIQUE (channel, external_key)
);

CREATE TABLE messages (
    id                INTEGER PRIMARY KEY AUTOINCREMENT,
    conversation_id   INTEGER NOT NULL REFERENCES conversations (id) ON DELETE CASCADE,
    role              TEXT    NOT NULL CHECK (role IN ('system', 'user', 'assistant')),
    content           TEXT    NOT NULL,
    -- Privacy ledger: which tier, provider (local | zai) and model produced an answer.
    tier              TEXT,
    provider          TEXT,
    model             TEXT,
    prompt_tokens     INTEGER,
    completion_tokens INTEGER,
    -- complete | partial (stopped or failed after some text) | error
    status            TEXT    NOT NULL DEFAULT 'complete'
                      CHECK (status IN ('complete', 'partial', 'error')),
    -- The channel's id for this message (wamid, Talk message id) when it has one.
    external_id       TEXT,
    -- Delivery of our outbound messages: sending | sent | delivered | read | failed |
    -- unknown; NULL before a send (or after one that will be tried again).
    delivery_status   TEXT,
    delivery_error    TEXT,
    created_at        INTEGER NOT NULL,
    -- The tool rounds of an answer, JSON (0004).
    tool_rounds       TEXT,
    -- Where an answer was produced, and whether it left the machine (0006).
    host              TEXT,
    left_machine      INTEGER NOT NULL DEFAULT 0 CHECK (left_machine IN (0, 1))
);

CREATE TABLE cron_jobs (
    id              INTEGER PRIMARY KEY AUTOINCREMENT,
    name            TEXT    NOT NULL,
    -- 5 or 6 field cron expression, or `at YYYY-MM-DD HH:MM` (a one-shot).
    schedule        TEXT    NOT NULL,
    -- IANA time zone; NULL means CRON_TIMEZONE or the system's.
    timezone        TEXT,
    prompt          TEXT    NOT NULL,
    channel         TEXT    NOT NULL CHECK (channel IN ('webchat', 'whatsapp', 'nextcloud')),
    target          TEXT    NOT NULL,
    tier            TEXT,
    enabled         INTEGER NOT NULL DEFAULT 1,
    last_run_at     INTEGER,
    -- delivered | failed | running
    last_outcome    TEXT,
    last_error      TEXT,
    created_at      INTEGER NOT NULL,
    updated_at      INTEGER NOT NULL,
    -- prompt | reminder (0005).
    kind            TEXT    NOT NULL DEFAULT 'prompt' CHECK (kind IN ('prompt', 'reminder')),
    -- The conversation a reminder was asked in (0005).
    conversation_id INTEGER REFERENCES conversations (id) ON DELETE CASCADE
);

CREATE TABLE cron_runs (
    id          INTEGER PRIMARY KEY,
    job_id      INTEGER NOT NULL REFERENCES cron_jobs (id) ON DELETE CASCADE,
    started_at  INTEGER NOT NULL,
    duration_ms INTEGER,
    outcome     TEXT    NOT NULL,
    error       TEXT,
    message_id  INTEGER REFERENCES messages (id) ON DELETE SET NULL
);

INSERT INTO conversations (id, channel, external_key, title, created_at, updated_at)
SELECT id, channel, external_key, title, created_at, updated_at FROM conversations_old;

INSERT INTO messages (id, conversation_id, role, content, tier, provider, model, prompt_tokens,
                      completion_tokens, status, external_id, delivery_status, delivery_error,
                      created_at, tool_rounds, host, left_machine)
SELECT id, conversation_id, role, content, tier, provider, model, prompt_tokens,
       completion_tokens, status, external_id, delivery_status, delivery_error,
       created_at, tool_rounds, host, left_machine
FROM messages_old;

INSERT INTO cron_jobs (id, name, schedule, timezone, prompt, channel, target, tier, enabled,
                       last_run_at, last_outcome, last_error, created_at, updated_at, kind,
                       conversation_id)
SELECT id, name, schedule, timezone, prompt, channel, target, tier, enabled,
       last_run_at, last_outcome, last_error, created_at, updated_at, kind, conversation_id
FROM cron_jobs_old;

INSERT INTO cron_runs (id, job_id, started_at, duration_ms, outcome, error, message_id)
SELECT id, job_id, started_at, duration_ms, outcome, error, message_id FROM cron_runs_old;

DROP TABLE cron_runs_old;
DROP TABLE messages_old;
DROP TABLE cron_jobs_old;
DROP TABLE conversations_old;

CREATE INDEX messages_by_conversation ON messages (conversation_id, id);
CREATE INDEX messages_by_external_id ON messages (external_id) WHERE external_id IS NOT NULL;
CREATE INDEX cron_runs_by_job ON cron_runs (job_id, id);
CREATE INDEX cron_jobs_by_conversation ON cron_jobs (conversation_id)
    WHERE conversation_id IS NOT NULL;

-- The full-text index's triggers (0003), on the new table.
CREATE TRIGGER messages_fts_after_insert AFTER INSERT ON messages BEGIN
    INSERT INTO messages_fts (rowid, content) VALUES (new.id, new.content);
END;

CREATE TRIGGER messages_fts_after_delete AFTER DELETE ON messages BEGIN
    INSERT INTO messages_fts (messages_fts, rowid, content) VALUES ('delete', old.id, old.content);
END;

CREATE TRIGGER messages_fts_after_update AFTER UPDATE OF content ON messages BEGIN
    INSERT INTO messages_fts (messages_fts, rowid, content) VALUES ('delete', old.id, old.content);
    INSERT INTO messages_fts (rowid, content) VALUES (new.id, new.content);
END;

-- Ids deleted before this migration cannot be known any more, except where a job still
-- names one: a WebChat job's target is a conversation id, and the next conversation must
-- not take it. (Each AUTOINCREMENT table got its row in sqlite_sequence from the copies
-- above, when it had any.)
INSERT INTO sqlite_sequence (name, seq)
SELECT 'conversations', 0
WHERE NOT EXISTS (SELECT 1 FROM sqlite_sequence WHERE name = 'conversations');
UPDATE sqlite_sequence
SET seq = MAX(seq, (SELECT COALESCE(MAX(CAST(target AS INTEGER)), 0)
                    FROM cron_jobs WHERE channel = 'webchat'))
WHERE name = 'conversations';
