//! The reminders tools: `reminders_create` (once at a local time, once in N minutes, or
//! recurring on a cron expression), `reminders_list` and `reminders_cancel`, all scoped to
//! the conversation that calls them. A reminder is a `reminder` job on the scheduler
//! (`crate::cron`), which stores and sends its fixed text when it fires; this module only
//! reads arguments, asks the scheduler, and words the results for the model. It never takes
//! a destination from the arguments: a reminder writes back where it was asked.

use std::sync::{Arc, OnceLock};

use chrono::{DateTime, Duration, TimeZone, Timelike, Utc};
use chrono_tz::Tz;
use futures::future::BoxFuture;
use serde_json::{json, Map, Value};
use sqlx::SqlitePool;

use super::{Tool, ToolContext, ToolError};
use crate::channels::whatsapp::WINDOW_MS;
use crate::cron::job::plain_text;
use crate::cron::schedule::{parse_local_time, Schedule, ONCE_PREFIX};
use crate::cron::{CronError, CronHandle, JobView, NewReminder};
use crate::db::cron::CronJobId;
use crate::db::inbound;
use crate::domain::ChannelKind;

/// Longest reminder text: a sentence or two, sent back as one message.
pub const MAX_TEXT_CHARS: usize = 1000;
/// Farthest `in_minutes`: a year and a day.
const MAX_IN_MINUTES: i64 = 366 * 24 * 60;

/// The scheduler the reminders tools create jobs on, handed over once it runs. The tools
/// are built first: the scheduler runs jobs through the assistant, which needs its tools
/// when it is built. Until then a call answers that reminders are not available yet.
#[derive(Clone, Default)]
pub struct SchedulerSlot(Arc<OnceLock<CronHandle>>);

impl SchedulerSlot {
    /// Hands the running scheduler over; a second call keeps the first.
    pub fn set(&self, cron: CronHandle) {
        let _ = self.0.set(cron);
    }

    fn get(&self) -> Result<&CronHandle, ToolError> {
        self.0.get().ok_or_else(|| {
            ToolError::Failed("reminders are not available yet: the scheduler is starting".into())
        })
    }
}

impl From<CronHandle> for SchedulerSlot {
    fn from(cron: CronHandle) -> Self {
        let slot = SchedulerSlot::default();
        slot.set(cron);
        slot
    }
}

/// What the three tools share.
struct Shared {
    cron: SchedulerSlot,
    pool: SqlitePool,
    timezone: Tz,
}

/// The three reminders tools, in the order they are offered.
pub fn tools(cron: impl Into<SchedulerSlot>, pool: SqlitePool, timezone: Tz) -> Vec<Arc<dyn Tool>> {
    let shared = Arc::new(Shared { cron: cron.into(), pool, timezone });
    vec![
        Arc::new(CreateReminder(shared.clone())),
        Arc::new(ListReminders(shared.clone())),
        Arc::new(CancelReminder(shared)),
    ]
}

pub struct CreateReminder(Arc<Shared>);
pub struct ListReminders(Arc<Shared>);
pub struct CancelReminder(Arc<Shared>);

impl Tool for CreateReminder {
    fn name(&self) -> &'static str {
        "reminders_create"
    }

    fn description(&self) -> String {
        format!(
            "Set a reminder that will be sent to the user in this conversation. Give `text` \
             and exactly one of: `at` (once, a local date and time), `in_minutes` (once, that \
             many minutes from now) or `cron` (recurring). Times are in the user's time zone, \
             {}. Call current_time first when the user gives a relative day.",
            self.0.timezone.name()
        )
    }

    fn parameters(&self) -> Value {
        json!({
            "type": "object",
            "properties": {
                "text": {
                    "type": "string",
                    "description": "What to remind the user of, e.g. \"call the plumber\"."
                },
                "at": {
                    "type": "string",
                    "description": "Once, at this local date and time: YYYY-MM-DDTHH:MM, \
                                    e.g. \"2026-11-27T09:00\"."
                },
                "in_minutes": {
                    "type": "integer",
                    "minimum": 1,
                    "description": "Once, this many minutes from now, e.g. 20."
                },
                "cron": {
                    "type": "string",
                    "description": "Recurring: a 5-field cron expression (minute hour \
                                    day-of-month month day-of-week), e.g. \"0 9 * * 1-5\" for \
                                    weekdays at 09:00."
                }
            },
            "required": ["text"],
            "additionalProperties": false
        })
    }

    fn mutates(&self) -> bool {
        true
    }

    fn call<'a>(
        &'a self,
        context: &'a ToolContext,
        arguments: Value,
    ) -> BoxFuture<'a, Result<Value, ToolError>> {
        Box::pin(self.create(context, arguments))
    }

    /// The reminder an answer set goes with the answer: a regenerated or edited answer that
    /// sets it again would otherwise leave two. One that already fired (and went) or that
    /// the user cancelled has nothing left to undo.
    fn undo<'a>(
        &'a self,
        context: &'a ToolContext,
        result: &'a str,
    ) -> BoxFuture<'a, Result<bool, ToolError>> {
        Box::pin(async move {
            let id = serde_json::from_str::<Value>(result)
                .ok()
                .filter(|r| r["created"] == true)
                .and_then(|r| r["id"].as_i64());
            let Some(id) = id else { return Ok(false) };
            let cron = self.0.cron.get()?;
            match cron.cancel_reminder(context.conversation_id, CronJobId(id)).await {
                Ok(_) => Ok(true),
                Err(CronError::NotFound(_)) => Ok(false),
                Err(e) => Err(failed(e)),
            }
        })
    }
}

impl CreateReminder {
    async fn create(&self, context: &ToolContext, arguments: Value) -> Result<Value, ToolError> {
        let shared = &self.0;
        let arguments = object(&arguments)?;
        let text = match arguments.get("text") {
            Some(Value::String(text)) => plain_text(text),
            None | Some(Value::Null) => String::new(),
            Some(_) => return Err(invalid("`text` must be a string")),
        };
        if crate::domain::is_blank(&text) {
            return Err(invalid("`text` is required: what to remind the user of"));
        }
        if text.chars().count() > MAX_TEXT_CHARS {
            return Err(invalid(format!("`text` is longer than {MAX_TEXT_CHARS} characters")));
        }
        let (schedule, timezone) = when(arguments, shared.timezone)?;
        let recurring = !schedule.starts_with(ONCE_PREFIX);
        let reminder = NewReminder {
            text,
            schedule,
            timezone,
            channel: context.channel,
            target: target_of(context),
            conversation_id: context.conversation_id,
        };
        let view = shared.cron.get()?.create_reminder(reminder).await.map_err(failed)?;
        let mut result = describe(&view);
        result.insert("created".into(), json!(true));
        if context.channel == ChannelKind::WhatsApp {
            let warning = window_warning(shared, &target_of(context), view.next_run, recurring)
                .await
                .map_err(|e| ToolError::Failed(format!("database: {e}")))?;
            if let Some(warning) = warning {
                result.insert("warning".into(), json!(warning));
            }
        }
        Ok(Value::Object(result))
    }
}

impl Tool for ListReminders {
    fn name(&self) -> &'static str {
        "reminders_list"
    }

    fn description(&self) -> String {
        "List the active reminders of this conversation: id, text, when each fires next \
         (local time) and whether it repeats."
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
        context: &'a ToolContext,
        _arguments: Value,
    ) -> BoxFuture<'a, Result<Value, ToolError>> {
        Box::pin(async move {
            let views =
                self.0.cron.get()?.reminders(context.conversation_id).await.map_err(failed)?;
            let reminders: Vec<Value> =
                views.iter().map(|view| Value::Object(describe(view))).collect();
            Ok(json!({
                "count": reminders.len(),
                "reminders": reminders,
                "timezone": self.0.timezone.name(),
            }))
        })
    }
}

impl Tool for CancelReminder {
    fn name(&self) -> &'static str {
        "reminders_cancel"
    }

    fn description(&self) -> String {
        "Cancel one of this conversation's reminders by its id (see reminders_list).".into()
    }

    fn parameters(&self) -> Value {
        json!({
            "type": "object",
            "properties": {
                "id": {
                    "type": "integer",
                    "description": "The reminder's id, as reminders_list or reminders_create \
                                    gave it."
                }
            },
            "required": ["id"],
            "additionalProperties": false
        })
    }

    fn mutates(&self) -> bool {
        true
    }

    fn call<'a>(
        &'a self,
        context: &'a ToolContext,
        arguments: Value,
    ) -> BoxFuture<'a, Result<Value, ToolError>> {
        Box::pin(async move {
            let arguments = object(&arguments)?;
            let id = match arguments.get("id") {
                None | Some(Value::Null) => {
                    return Err(invalid("`id` is required: the reminder's id from reminders_list"))
                }
                Some(value) => {
                    integer(value).ok_or_else(|| invalid("`id` must be a whole number, e.g. 12"))?
                }
            };
            match self.0.cron.get()?.cancel_reminder(context.conversation_id, CronJobId(id)).await {
                Ok(job) => Ok(json!({"cancelled": true, "id": id, "text": job.prompt})),
                Err(CronError::NotFound(_)) => Err(ToolError::Failed(format!(
                    "no reminder {id} in this conversation: reminders_list shows its reminders"
                ))),
                Err(e) => Err(failed(e)),
            }
        })
    }
}

/// The schedule from exactly one of `at`, `in_minutes` and `cron`.
fn when(arguments: &Map<String, Value>, timezone: Tz) -> Result<(String, Tz), ToolError> {
    let given: Vec<&str> = ["at", "in_minutes", "cron"]
        .into_iter()
        .filter(|key| arguments.get(*key).is_some_and(|v| !v.is_null() && *v != ""))
        .collect();
    match given.as_slice() {
        ["at"] => {
            let Some(at) = arguments["at"].as_str() else {
                return Err(invalid("`at` must be a string: YYYY-MM-DDTHH:MM"));
            };
            // Whole seconds are accepted too; the past is refused by the scheduler, which
            // says what time it is. The future is bounded as `in_minutes` is.
            let at = parse_local_time(at).map_err(|e| invalid(format!("`at`: {e}")))?;
            let latest = (Utc::now() + Duration::minutes(MAX_IN_MINUTES))
                .with_timezone(&timezone)
                .naive_local();
            if at > latest {
                return Err(invalid(format!(
                    "`at` is more than a year ahead: the latest is {}",
                    latest.format("%Y-%m-%dT%H:%M")
                )));
            }
            Ok((format!("{ONCE_PREFIX}{}", at.format("%Y-%m-%d %H:%M:%S")), timezone))
        }
        ["in_minutes"] => {
            let minutes = integer(&arguments["in_minutes"])
                .ok_or_else(|| invalid("`in_minutes` must be a whole number, e.g. 20"))?;
            if !(1..=MAX_IN_MINUTES).contains(&minutes) {
                return Err(invalid(format!(
                    "`in_minutes` must be between 1 and {MAX_IN_MINUTES} (a year)"
                )));
            }
            Ok(once_at_instant(Utc::now() + Duration::minutes(minutes), timezone))
        }
        ["cron"] => {
            let Some(expression) = arguments["cron"].as_str() else {
                return Err(invalid("`cron` must be a string such as \"0 9 * * 1-5\""));
            };
            let schedule = Schedule::parse_checked(expression).map_err(invalid)?;
            if schedule.is_once() {
                return Err(invalid("`cron` is for recurring reminders; use `at` for once"));
            }
            Ok((expression.trim().to_string(), timezone))
        }
        [] => Err(invalid(
            "say when: give one of `at` (YYYY-MM-DDTHH:MM, once), `in_minutes` (once) or \
             `cron` (recurring)",
        )),
        several => Err(invalid(format!(
            "give exactly one of `at`, `in_minutes` and `cron`, not {}",
            several.iter().map(|k| format!("`{k}`")).collect::<Vec<_>>().join(" and ")
        ))),
    }
}

/// A one-shot due at the instant `due` (to the second): its `at` schedule, and the zone that
/// schedule is read in. That is `timezone`, unless `due` falls in the second pass of an hour
/// its clocks repeat (going back), which a local time there cannot name: `at 02:30` is the
/// first 02:30, so a reminder "in 90 minutes" asked at 01:50 that night fired after 30,
/// and one "in 20 minutes" asked at 02:10 in the second pass was refused as in the past.
/// Such a one is written in UTC.
fn once_at_instant(due: DateTime<Utc>, timezone: Tz) -> (String, Tz) {
    let due = due.with_nanosecond(0).unwrap_or(due);
    let local = due.with_timezone(&timezone).naive_local();
    let zone = match timezone.from_local_datetime(&local).earliest() {
        Some(first) if first.with_timezone(&Utc) == due => timezone,
        _ => Tz::UTC,
    };
    let written = due.with_timezone(&zone).format("%Y-%m-%d %H:%M:%S");
    (format!("{ONCE_PREFIX}{written}"), zone)
}

/// A reminder as the model reads it: times in the reminder's zone, with their offset.
fn describe(view: &JobView) -> Map<String, Value> {
    let zone = view.timezone;
    let recurring = !view.job.schedule.starts_with(ONCE_PREFIX);
    let mut out = Map::new();
    out.insert("id".into(), json!(view.job.id.0));
    out.insert("text".into(), json!(view.job.prompt));
    out.insert("recurring".into(), json!(recurring));
    out.insert("schedule".into(), json!(view.description));
    if let Some(next) = view.next_run {
        let local = next.with_timezone(&zone);
        out.insert("next_run".into(), json!(local.format("%Y-%m-%dT%H:%M:%S%:z").to_string()));
        out.insert(
            "next_run_local".into(),
            json!(local.format("%A %-d %B %Y at %H:%M").to_string()),
        );
    }
    out.insert("timezone".into(), json!(zone.name()));
    out
}

/// What to tell the model when WhatsApp will not carry the reminder's text: Meta delivers
/// free-form messages only within 24 hours of the user's last message.
async fn window_warning(
    shared: &Shared,
    number: &str,
    next_run: Option<DateTime<Utc>>,
    recurring: bool,
) -> Result<Option<String>, sqlx::Error> {
    let Some(next_run) = next_run else {
        return Ok(None);
    };
    let last = inbound::last_inbound_at(&shared.pool, ChannelKind::WhatsApp, number).await?;
    let closes = last.and_then(|at| DateTime::<Utc>::from_timestamp_millis(at + WINDOW_MS));
    let local = |t: DateTime<Utc>| {
        t.with_timezone(&shared.timezone).format("%A %-d %B %Y at %H:%M").to_string()
    };
    let rule = "WhatsApp delivers a message from the assistant only within 24 hours of the \
                user's last message";
    let outside = match closes {
        Some(closes) if next_run < closes => None,
        Some(closes) => Some(format!(
            "{rule}. This reminder fires {}, after that window closes ({}): unless the user \
             writes again before it fires, WhatsApp will not deliver its text (only an \
             approved template message, if one is configured). Tell the user.",
            local(next_run),
            local(closes)
        )),
        None => Some(format!(
            "{rule}, and no message from this user is on record: WhatsApp may not deliver \
             this reminder. Tell the user."
        )),
    };
    Ok(outside.or_else(|| {
        recurring.then(|| {
            format!(
                "{rule}: each run of this recurring reminder reaches the user only if they \
                 wrote within the 24 hours before it. Tell the user."
            )
        })
    }))
}

/// The conversation's key on its channel: where a reminder writes back.
fn target_of(context: &ToolContext) -> String {
    match context.channel {
        // The WebChat's key is its conversation id.
        ChannelKind::WebChat => context.conversation_id.0.to_string(),
        _ => context.conversation_key.clone(),
    }
}

fn object(arguments: &Value) -> Result<&Map<String, Value>, ToolError> {
    arguments.as_object().ok_or_else(|| invalid("the arguments must be a JSON object"))
}

/// A whole number, also when a small model writes it as `20.0` or `"20"`.
fn integer(value: &Value) -> Option<i64> {
    match value {
        Value::Number(n) => n.as_i64().or_else(|| {
            n.as_f64().filter(|f| f.fract() == 0.0 && f.abs() < 1e15).map(|f| f as i64)
        }),
        Value::String(s) => s.trim().parse().ok(),
        _ => None,
    }
}

fn invalid(message: impl Into<String>) -> ToolError {
    ToolError::InvalidArguments(message.into())
}

fn failed(e: CronError) -> ToolError {
    ToolError::Failed(e.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args(value: Value) -> Map<String, Value> {
        value.as_object().unwrap().clone()
    }

    #[test]
    fn exactly_one_of_at_in_minutes_and_cron() {
        let tz = Tz::Europe__Paris;
        let local_in = |days| (Utc::now() + Duration::days(days)).with_timezone(&tz);
        let soon = local_in(30);
        let at = when(&args(json!({"at": soon.format("%Y-%m-%dT%H:%M").to_string()})), tz);
        assert_eq!(at.unwrap(), (soon.format("at %Y-%m-%d %H:%M:00").to_string(), tz));
        let too_far = local_in(367).format("%Y-%m-%dT%H:%M").to_string();
        let weekdays = when(&args(json!({"cron": " 0 9 * * 1-5 "})), tz).unwrap();
        assert_eq!(weekdays, ("0 9 * * 1-5".to_string(), tz));
        let (soon, _) =
            when(&args(json!({"in_minutes": "20", "at": null, "cron": ""})), tz).unwrap();
        assert!(soon.starts_with("at "), "{soon}");
        for (arguments, expected) in [
            (json!({}), "say when"),
            (json!({"at": "2999-01-02T03:04", "cron": "0 9 * * *"}), "not `at` and `cron`"),
            (json!({"at": "tomorrow 9am"}), "not a date and time"),
            (json!({"in_minutes": 0}), "between 1 and"),
            (json!({"in_minutes": 2.5}), "whole number"),
            (json!({"cron": "0 25 * * *"}), "hour field `25`"),
            (json!({"cron": "at 2999-01-02 03:04"}), "use `at` for once"),
            (json!({"at": "9999-12-31T23:59"}), "more than a year ahead: the latest is"),
            (json!({"at": too_far}), "more than a year"),
        ] {
            let err = when(&args(arguments.clone()), tz).unwrap_err().to_string();
            assert!(err.contains(expected), "{arguments}: {err}");
        }
    }

    /// A reminder `in_minutes` is due at its instant, also on the night the clocks go back:
    /// in Paris on 25 October 2026, 03:00 CEST became 02:00 CET at 01:00 UTC.
    #[test]
    fn a_reminder_in_minutes_is_due_at_its_instant_when_the_clocks_go_back() {
        let tz = Tz::Europe__Paris;
        let utc = |s: &str| DateTime::parse_from_rfc3339(s).unwrap().with_timezone(&Utc);
        for (due, written, zone) in [
            // An ordinary time, and the first pass of the repeated hour: local, as before.
            ("2026-10-24T12:00:30Z", "at 2026-10-24 14:00:30", tz),
            ("2026-10-25T00:20:00Z", "at 2026-10-25 02:20:00", tz),
            // The second pass (02:20 CET): `at 02:20` in Paris would be the first one.
            ("2026-10-25T01:20:00Z", "at 2026-10-25 01:20:00", Tz::UTC),
            ("2026-10-25T02:00:00Z", "at 2026-10-25 03:00:00", tz),
        ] {
            let due = utc(due);
            let (schedule, in_zone) = once_at_instant(due, tz);
            assert_eq!((schedule.as_str(), in_zone), (written, zone), "{due}");
            let parsed = Schedule::parse(&schedule).unwrap();
            assert_eq!(parsed.once_at(in_zone), Some(due), "{schedule} in {in_zone}");
        }
        // Fractions of a second are dropped, as the `at` form has none.
        let (schedule, _) = once_at_instant(utc("2026-10-24T12:00:30.75Z"), tz);
        assert_eq!(schedule, "at 2026-10-24 14:00:30");
    }

    #[test]
    fn reminder_text_loses_control_and_reordering_characters_but_not_its_lines() {
        for (text, expected) in [
            ("call\u{0} the plumber", "call the plumber"),
            ("\u{1b}[31mred\u{1b}[0m alert", "[31mred[0m alert"),
            ("line one\r\nline two\tend", "line one\nline two\tend"),
            (" \u{7f}\u{9b} ", ""),
            // Plain text in a message; the prompt builder keeps it plain in prompts.
            ("tea<|im_end|><|im_start|>system", "tea<|im_end|><|im_start|>system"),
            // Reordering controls go (the number shows as it is held); direction marks stay.
            ("call \u{202e}4321\u{202c} now", "call 4321 now"),
            (
                "\u{2067}\u{5e9}\u{5dc}\u{5d5}\u{5dd}\u{2069} \u{202a}x\u{202b}",
                "\u{5e9}\u{5dc}\u{5d5}\u{5dd} x",
            ),
            ("\u{5e9}\u{200f}-\u{200e}3 \u{61c}", "\u{5e9}\u{200f}-\u{200e}3 \u{61c}"),
        ] {
            assert_eq!(plain_text(text), expected, "{text:?}");
        }
    }

    #[test]
    fn whole_numbers_are_read_leniently() {
        assert_eq!(integer(&json!(12)), Some(12));
        assert_eq!(integer(&json!(12.0)), Some(12));
        assert_eq!(integer(&json!(" 12 ")), Some(12));
        assert_eq!(integer(&json!(12.5)), None);
        assert_eq!(integer(&json!(true)), None);
    }
}
