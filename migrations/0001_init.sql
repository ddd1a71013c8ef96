-- my-claw schema, version 1.
-- Migrations are never edited once applied (sqlx checks their checksums at start):
-- change the schema by adding a new numbered file.
-- Times are Unix milliseconds (INTEGER), written by the application.

CREATE TABLE conversations (
    id            INTEGER PRIMARY KEY,
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
    id                INTEGER PRIMARY KEY,
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
    -- Delivery of our outbound messages: sent | delivered | read | failed.
    delivery_status   TEXT,
    delivery_error    TEXT,
    created_at        INTEGER NOT NULL
);
CREATE INDEX messages_by_conversation ON messages (conversation_id, id);
CREATE INDEX messages_by_external_id ON messages (external_id) WHERE external_id IS NOT NULL;

CREATE TABLE settings (
    key        TEXT PRIMARY KEY,
    value      TEXT    NOT NULL,
    updated_at INTEGER NOT NULL
);

CREATE TABLE cron_jobs (
    id           INTEGER PRIMARY KEY,
    name         TEXT    NOT NULL,
    -- 5 or 6 field cron expression.
    schedule     TEXT    NOT NULL,
    -- IANA time zone; NULL means CRON_TIMEZONE or the system's.
    timezone     TEXT,
    prompt       TEXT    NOT NULL,
    channel      TEXT    NOT NULL CHECK (channel IN ('webchat', 'whatsapp', 'nextcloud')),
    target       TEXT    NOT NULL,
    tier         TEXT,
    enabled      INTEGER NOT NULL DEFAULT 1,
    last_run_at  INTEGER,
    -- delivered | failed | running
    last_outcome TEXT,
    last_error   TEXT,
    created_at   INTEGER NOT NULL,
    updated_at   INTEGER NOT NULL
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
CREATE INDEX cron_runs_by_job ON cron_runs (job_id, id);

-- Durable, deduplicated intake of channel messages: written before the webhook answers
-- 200, processed asynchronously, and picked up again after a restart.
CREATE TABLE inbound_queue (
    id           INTEGER PRIMARY KEY,
    channel      TEXT    NOT NULL,
    external_id  TEXT    NOT NULL,
    payload      TEXT    NOT NULL,
    -- pending | processing | done | failed | ignored
    status       TEXT    NOT NULL DEFAULT 'pending',
    attempts     INTEGER NOT NULL DEFAULT 0,
    last_error   TEXT,
    received_at  INTEGER NOT NULL,
    processed_at INTEGER,
    UNIQUE (channel, external_id)
);
CREATE INDEX inbound_queue_pending ON inbound_queue (status, id);

-- Per-address facts of a channel: the last inbound time decides WhatsApp's 24-hour window.
CREATE TABLE contacts (
    channel         TEXT    NOT NULL,
    address         TEXT    NOT NULL,
    display_name    TEXT,
    last_inbound_at INTEGER,
    PRIMARY KEY (channel, address)
);
