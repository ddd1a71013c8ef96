-- The tool rounds of an answer (issue 15): the calls the assistant made while producing it
-- and their results, stored with the answer so that later prompts show the model its own
-- tool use and the privacy ledger says which tools ran. JSON text, NULL when none:
--   [{"text": "...", "calls": [{"id": "call_…", "name": "…", "arguments": "{…}"}],
--     "results": [{"call_id": "call_…", "content": "…", "is_error": false}]}]
-- One answer stays one message row, so message counts and the history window are unchanged.
ALTER TABLE messages ADD COLUMN tool_rounds TEXT;
