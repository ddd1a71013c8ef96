//! The `current_time` tool: now, in the user's time zone (`TIMEZONE`), as the model needs it
//! to read "tomorrow at 9" or "in two hours". Owns only the clock reading and its JSON; the
//! zone is chosen by `config`/`app.rs`, never here.

use chrono::{DateTime, Utc};
use chrono_tz::Tz;
use futures::future::BoxFuture;
use serde_json::{json, Value};

use super::{Tool, ToolContext, ToolError};

/// Says the local date, time, weekday and zone.
pub struct CurrentTime {
    timezone: Tz,
}

impl CurrentTime {
    pub fn new(timezone: Tz) -> Self {
        CurrentTime { timezone }
    }

    /// The answer for instant `now` (separate from the clock so that it can be tested).
    pub fn reading(&self, now: DateTime<Utc>) -> Value {
        let local = now.with_timezone(&self.timezone);
        json!({
            "now": local.format("%Y-%m-%dT%H:%M:%S%:z").to_string(),
            "date": local.format("%Y-%m-%d").to_string(),
            "time": local.format("%H:%M").to_string(),
            "weekday": local.format("%A").to_string(),
            "timezone": self.timezone.name(),
        })
    }
}

impl Tool for CurrentTime {
    fn name(&self) -> &'static str {
        "current_time"
    }

    fn description(&self) -> String {
        // Fixed text (no time in it): the tools block stays byte-identical across turns, so
        // the model's KV cache of the prompt is reused.
        "Get the current local date, time and weekday of the user, with their time zone. Use \
         it before answering about today, now or a relative date, and before setting a \
         reminder."
            .into()
    }

    fn parameters(&self) -> Value {
        json!({"type": "object", "properties": {}, "additionalProperties": false})
    }

    fn mutates(&self) -> bool {
        false
    }

    fn call<'a>(
        &'a self,
        _context: &'a ToolContext,
        _arguments: Value,
    ) -> BoxFuture<'a, Result<Value, ToolError>> {
        Box::pin(async move { Ok(self.reading(Utc::now())) })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_reading_is_local_with_its_offset() {
        let now = DateTime::parse_from_rfc3339("2026-11-26T17:02:09Z").unwrap().to_utc();
        let paris = CurrentTime::new(Tz::Europe__Paris).reading(now);
        assert_eq!(
            paris,
            json!({"now": "2026-11-26T18:02:09+01:00", "date": "2026-11-26", "time": "18:02",
                   "weekday": "Thursday", "timezone": "Europe/Paris"})
        );
        // Summer time, and a zone east of the date line on the next day.
        let summer = DateTime::parse_from_rfc3339("2026-07-01T23:30:00Z").unwrap().to_utc();
        let reading = CurrentTime::new(Tz::Europe__Paris).reading(summer);
        assert_eq!(reading["now"], "2026-07-02T01:30:00+02:00");
        assert_eq!(reading["weekday"], "Thursday");
        let reading = CurrentTime::new(Tz::UTC).reading(summer);
        assert_eq!(reading["now"], "2026-07-01T23:30:00+00:00");
    }
}
