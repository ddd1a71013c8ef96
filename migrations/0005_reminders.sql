-- Reminders on the scheduler (issue 15): a job has a kind, and a reminder remembers the
-- conversation it was asked in.
-- Migrations are never edited once applied: change the schema by adding a new file.

-- prompt: at each run the prompt is answered by the model in the target conversation.
-- reminder: at each run the fixed text `⏰ Reminder: <prompt>` is stored in the conversation
-- and sent on its channel, without asking a model.
ALTER TABLE cron_jobs ADD COLUMN kind TEXT NOT NULL DEFAULT 'prompt'
    CHECK (kind IN ('prompt', 'reminder'));
-- The conversation a reminder was asked in (its channel and target point at it too); the
-- reminders tools list and cancel only a conversation's own. Deleting the conversation
-- deletes its reminders.
ALTER TABLE cron_jobs ADD COLUMN conversation_id INTEGER
    REFERENCES conversations (id) ON DELETE CASCADE;

CREATE INDEX cron_jobs_by_conversation ON cron_jobs (conversation_id)
    WHERE conversation_id IS NOT NULL;
