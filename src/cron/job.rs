//! What a valid job is: merging a create or an edit over the stored job, the size limits,
//! how often it may run, and the target checked against the channels this instance has
//! configured (and their allow-lists). Every refusal names the request field it is about
//! (`CronError::Invalid`'s `field`). Reads conversations to check WebChat targets; writes
//! nothing.

use chrono_tz::Tz;
use sqlx::SqlitePool;

use crate::channels::Channels;
use crate::cron::schedule::{parse_timezone, Schedule};
use crate::cron::{CronError, ShortestInterval, DEFAULT_TIER};
use crate::db::cron::{JobKind, JobSpec};
use crate::db::memory;
use crate::domain::{ChannelKind, ConversationId};
use crate::llm::router::Tier;

/// Longest prompt: a few paragraphs of instructions. A scheduled prompt is stored in its
/// conversation and prefilled at every run, so a pasted document would cost engine time
/// at each occurrence.
pub const MAX_PROMPT_CHARS: usize = 4000;
/// Longest name: a label in a list.
pub const MAX_NAME_CHARS: usize = 100;
/// Longest target as typed (a number with separators, a room token, a conversation id).
const MAX_TARGET_CHARS: usize = 64;

/// A create or a partial edit. `None` leaves a field as it is (or, on create, uses its
/// default); `Some(None)` in `timezone`/`tier` resets the field to its default.
#[derive(Debug, Clone, Default)]
pub struct JobChanges {
    pub name: Option<String>,
    pub schedule: Option<String>,
    pub timezone: Option<Option<String>>,
    pub prompt: Option<String>,
    pub channel: Option<String>,
    pub target: Option<String>,
    pub tier: Option<Option<String>>,
    pub enabled: Option<bool>,
    /// Only checked: a job keeps its kind, and the API creates `prompt` jobs (reminders
    /// come from the reminders tool), so a different one is refused, never ignored.
    pub kind: Option<String>,
}

/// What a job is checked against besides its own fields.
#[derive(Debug, Clone, Copy)]
pub(super) struct Rules {
    /// The zone of jobs that name none (a one-shot time is checked in it).
    pub default_timezone: Tz,
    /// How often an enabled job may run.
    pub shortest_interval: ShortestInterval,
}

/// Merges `changes` over `current` (an edit) or the defaults (a create) and checks every
/// field, the target against the configured channels included.
pub(super) async fn validate(
    pool: &SqlitePool,
    channels: &Channels,
    changes: JobChanges,
    current: Option<JobSpec>,
    rules: Rules,
) -> Result<JobSpec, CronError> {
    if let Some(kind) = changes.kind.as_deref().map(str::trim) {
        let own = current.as_ref().map_or(JobKind::Prompt, |c| c.kind);
        if kind != own.as_str() {
            let shown: String = kind.chars().take(32).collect();
            let message = match current {
                None => format!(
                    "`kind` `{shown}`: jobs made here are `prompt` jobs; a reminder is made by \
                     asking the assistant (\"remind me tomorrow at 9 to …\")"
                ),
                Some(_) => format!(
                    "`kind` `{shown}`: a job's kind cannot be changed (this one is a `{}` job)",
                    own.as_str()
                ),
            };
            return Err(CronError::invalid("kind", message));
        }
    }
    let reminder = current.as_ref().filter(|c| c.kind == JobKind::Reminder).cloned();
    // Where the job wrote before this edit, if anywhere.
    let was = current.as_ref().map(|c| (c.channel, c.target.clone()));
    let kept = current.clone();
    let spec = merge_changes(changes, current)?;
    // Disabling a job, and changing nothing else, always works: a stored job whose schedule
    // can no longer be saved (it runs more than once a minute, or cannot be read) must
    // still be stoppable. Its fields are stored ones, so there is nothing to check.
    if let Some(kept) = &kept {
        if !spec.enabled && spec == (JobSpec { enabled: false, ..kept.clone() }) {
            return Ok(spec);
        }
    }
    // A reminder writes back where it was asked, whoever edits it: a new channel is refused
    // before its target is read as one of that channel's (a target is compared once
    // normalised, so `012` is still conversation 12).
    let moved = |field| {
        CronError::invalid(
            field,
            "a reminder writes back to the conversation it was asked in: its channel and \
             target cannot be changed (delete it and ask again in the other conversation)",
        )
    };
    if reminder.as_ref().is_some_and(|r| r.channel != spec.channel) {
        return Err(moved("channel"));
    }
    // The stored schedule, kept by this edit, could not be saved even disabled (stored
    // before the shortest interval was a rule, or written around the API).
    let stuck = kept.is_some_and(|kept| {
        kept.schedule == spec.schedule
            && Schedule::parse_checked(&kept.schedule)
                .and_then(|schedule| rules.shortest_interval.check(&schedule))
                .is_err()
    });
    let spec = check_spec(spec, rules).map_err(|refused| match refused {
        // Say what to change.
        CronError::Invalid { field: "schedule", message } if stuck => CronError::invalid(
            "schedule",
            format!(
                "{message}. Change this job's schedule in the same edit: as it is, the job can \
                 only be disabled or deleted"
            ),
        ),
        refused => refused,
    })?;
    if reminder.is_some_and(|r| r.target != spec.target) {
        return Err(moved("target"));
    }
    // A new target, or a job about to run, must be reachable. A disabled job keeps the
    // target it has, so one whose conversation was deleted or whose number left the
    // allow-list can still be renamed, rescheduled or disabled, not only deleted.
    if spec.enabled || was != Some((spec.channel, spec.target.clone())) {
        check_reachable(pool, channels, spec.channel, &spec.target).await?;
    }
    Ok(spec)
}

/// Checks a reminder made by the reminders tool: the same rules as any job.
pub(super) async fn validate_new(
    pool: &SqlitePool,
    channels: &Channels,
    spec: JobSpec,
    rules: Rules,
) -> Result<JobSpec, CronError> {
    let spec = check_spec(spec, rules)?;
    check_reachable(pool, channels, spec.channel, &spec.target).await?;
    Ok(spec)
}

/// Fills a draft from `changes` over `base` (an edit) or the defaults (a create).
fn merge_changes(changes: JobChanges, base: Option<JobSpec>) -> Result<JobSpec, CronError> {
    let required = |field: &'static str, what: &str| {
        CronError::invalid(field, format!("`{field}` is required: {what}"))
    };
    let creating = base.is_none();
    let base = base.unwrap_or(JobSpec {
        name: String::new(),
        schedule: String::new(),
        timezone: None,
        prompt: String::new(),
        channel: ChannelKind::WebChat,
        target: String::new(),
        tier: None,
        enabled: true,
        kind: JobKind::Prompt,
        conversation_id: None,
    });
    let channel = match changes.channel {
        Some(name) => ChannelKind::parse(name.trim()).ok_or_else(|| {
            let shown: String = name.chars().take(32).collect();
            let message = format!("unknown channel `{shown}`: use webchat, whatsapp or nextcloud");
            CronError::invalid("channel", message)
        })?,
        None if creating => {
            return Err(required("channel", "webchat, whatsapp or nextcloud"));
        }
        None => base.channel,
    };
    let spec = JobSpec {
        name: changes.name.unwrap_or(base.name),
        schedule: changes.schedule.unwrap_or(base.schedule),
        timezone: changes.timezone.unwrap_or(base.timezone),
        prompt: changes.prompt.unwrap_or(base.prompt),
        channel,
        target: changes.target.unwrap_or(base.target),
        tier: changes.tier.unwrap_or(base.tier),
        enabled: changes.enabled.unwrap_or(base.enabled),
        kind: base.kind,
        conversation_id: base.conversation_id,
    };
    if spec.schedule.trim().is_empty() {
        return Err(required(
            "schedule",
            "a cron expression such as `0 8 * * *`, or `at 2026-11-27 09:00` for once",
        ));
    }
    if spec.prompt.trim().is_empty() {
        return Err(required("prompt", "what the assistant is asked at each run"));
    }
    if spec.target.trim().is_empty() {
        return Err(required(
            "target",
            "the WebChat conversation id, the WhatsApp number or the Nextcloud Talk room token",
        ));
    }
    Ok(spec)
}

/// Checks the size and form of every field of a merged draft and normalises them. An
/// enabled job must be ahead in its zone (its own, else the default one) when it is a
/// one-shot, and run no more often than `rules.shortest_interval` allows.
fn check_spec(spec: JobSpec, rules: Rules) -> Result<JobSpec, CronError> {
    // A reminder's text is sent as it is stored, so an edit of it is held to what the tool
    // stores (`plain_text`).
    let prompt = match spec.kind {
        JobKind::Reminder => plain_text(&spec.prompt),
        JobKind::Prompt => spec.prompt.trim().to_string(),
    };
    // Lengths first: a 100 KB field gets a short answer, not a parse or an echo of itself.
    if prompt.chars().count() > MAX_PROMPT_CHARS {
        let message = format!("`prompt` is longer than {MAX_PROMPT_CHARS} characters");
        return Err(CronError::invalid("prompt", message));
    }
    // Only control or invisible characters (a lone NUL) ask nothing: refused as a chat
    // message is, rather than stored and sent to the model at every run. Checked here and
    // not with the empty prompt in `merge_changes`, so that a job stored with one can still
    // be disabled.
    if crate::domain::is_blank(&prompt) {
        let message = match spec.kind {
            JobKind::Reminder => "`prompt` is required: the text of the reminder",
            JobKind::Prompt => "`prompt` is required: what the assistant is asked at each run",
        };
        return Err(CronError::invalid("prompt", message));
    }
    let mut name = spec.name.trim().to_string();
    if name.chars().count() > MAX_NAME_CHARS {
        let message = format!("`name` is longer than {MAX_NAME_CHARS} characters");
        return Err(CronError::invalid("name", message));
    }
    if crate::domain::is_blank(&name) {
        // A job without a name (or with one that shows as nothing, a NUL) is called by the
        // start of what it asks.
        name = prompt.chars().take(40).collect();
    }
    if spec.target.trim().chars().count() > MAX_TARGET_CHARS {
        let message = format!("`target` is longer than {MAX_TARGET_CHARS} characters");
        return Err(CronError::invalid("target", message));
    }
    let timezone = match spec.timezone.as_deref().map(str::trim).filter(|tz| !tz.is_empty()) {
        Some(name) => Some(parse_timezone(name).map_err(invalid("timezone"))?),
        None => None,
    };
    let zone = timezone.unwrap_or(rules.default_timezone);
    // A disabled one-shot may keep a time gone by: enabling it is what is refused. A
    // schedule that runs more than once a minute is refused enabled or not, since no job
    // could ever run on it (one stored before the rule can only be disabled or deleted).
    let parsed = if spec.enabled {
        Schedule::parse_upcoming(&spec.schedule, zone)
    } else {
        Schedule::parse_checked(&spec.schedule)
    }
    .map_err(invalid("schedule"))?;
    rules.shortest_interval.check(&parsed).map_err(invalid("schedule"))?;
    let schedule = parsed.canonical(&spec.schedule);
    let timezone = timezone.map(|tz| tz.name().to_string());
    let tier = match spec.tier.as_deref().map(str::trim).filter(|tier| !tier.is_empty()) {
        Some(name) => Tier::from_name(name).ok_or_else(|| {
            let shown: String = name.chars().take(32).collect();
            let message = format!("unknown tier `{shown}`: use fast, smart, main, code or reason");
            CronError::invalid("tier", message)
        })?,
        None => DEFAULT_TIER,
    };
    let target = check_target(spec.channel, spec.target.trim()).map_err(invalid("target"))?;
    Ok(JobSpec {
        name,
        schedule,
        timezone,
        prompt,
        channel: spec.channel,
        target,
        tier: Some(tier.as_str().to_string()),
        enabled: spec.enabled,
        kind: spec.kind,
        conversation_id: spec.conversation_id,
    })
}

/// A reminder's text as it is stored and sent, whether the reminders tool made it or an
/// edit through the API changed it (`check_spec`): without control characters other than
/// newline and tab (a NUL, an escape sequence, a carriage return) and without the bidi
/// embeddings, overrides and isolates (U+202A-U+202E, U+2066-U+2069), trimmed. Those
/// reorder what a phone shows ("Trojan Source", CVE-2021-42574): a model's text could
/// show a number or a name other than the one it holds. The marks (LRM, RLM, ALM) stay:
/// they set the direction of neutral characters in right-to-left text and reorder
/// nothing. Chat-template markers (`<|im_end|>`) are left: they are plain text in a
/// message, and the prompt builder keeps them plain text when the reminder comes back into
/// a prompt (`engine::template::push_text`).
pub fn plain_text(text: &str) -> String {
    let reorders = |c: char| matches!(c, '\u{202a}'..='\u{202e}' | '\u{2066}'..='\u{2069}');
    let kept: String = text
        .chars()
        .filter(|&c| (!c.is_control() || c == '\n' || c == '\t') && !reorders(c))
        .collect();
    kept.trim().to_string()
}

/// Makes a refusal of the request field `field` from its message, for `map_err`.
fn invalid(field: &'static str) -> impl Fn(String) -> CronError {
    move |message| CronError::invalid(field, message)
}

/// The target in the form its channel uses for conversation keys.
fn check_target(channel: ChannelKind, target: &str) -> Result<String, String> {
    match channel {
        // A conversation id, kept as its number is written (`012` is `12`).
        ChannelKind::WebChat => match target.parse::<i64>() {
            Ok(id) if id > 0 => Ok(id.to_string()),
            _ => Err(format!(
                "target `{target}`: not a WebChat conversation id (open the conversation in \
                 the WebChat and use its id)"
            )),
        },
        ChannelKind::WhatsApp => {
            // WhatsApp ids are the number's digits, without `+` or separators.
            let digits: String = target
                .chars()
                .filter(|c| !matches!(c, '+' | ' ' | '-' | '(' | ')' | '.'))
                .collect();
            if (6..=15).contains(&digits.len()) && digits.chars().all(|c| c.is_ascii_digit()) {
                Ok(digits)
            } else {
                Err(format!(
                    "target `{target}`: not a WhatsApp number (international format, e.g. \
                     +33612345678)"
                ))
            }
        }
        ChannelKind::Nextcloud => {
            if target.chars().all(|c| c.is_ascii_alphanumeric()) {
                Ok(target.to_string())
            } else {
                Err(format!(
                    "target `{target}`: not a Nextcloud Talk room token (letters and digits, \
                     the end of the room's link)"
                ))
            }
        }
    }
}

/// Whether answers can reach the target at all: its channel is configured, a WhatsApp
/// number is one the assistant talks with, a WebChat target is a WebChat conversation.
/// Refusing here beats a job that is accepted and then fails at every run.
async fn check_reachable(
    pool: &SqlitePool,
    channels: &Channels,
    channel: ChannelKind,
    target: &str,
) -> Result<(), CronError> {
    match channel {
        ChannelKind::WebChat => {
            let missing = || {
                CronError::invalid(
                    "target",
                    format!(
                        "target `{target}`: no WebChat conversation has this id (open the \
                         conversation in the WebChat and use its id)"
                    ),
                )
            };
            let id = target.parse::<i64>().map_err(|_| missing())?;
            match memory::get_conversation(pool, ConversationId(id)).await? {
                Some(c) if c.channel == ChannelKind::WebChat => Ok(()),
                _ => Err(missing()),
            }
        }
        ChannelKind::WhatsApp => {
            let Some(whatsapp) = channels.get(ChannelKind::WhatsApp) else {
                return Err(not_configured("WhatsApp", "the WHATSAPP_* settings"));
            };
            // The allow-list is who the assistant talks with; with none set it talks with
            // nobody (incoming messages are ignored too), so no number passes.
            if !whatsapp.is_allowed(target) {
                return Err(CronError::invalid(
                    "target",
                    format!(
                        "target `+{target}`: this number is not in WHATSAPP_ALLOWED_NUMBERS, \
                         the numbers the assistant talks with"
                    ),
                ));
            }
            Ok(())
        }
        ChannelKind::Nextcloud if channels.is_configured(ChannelKind::Nextcloud) => Ok(()),
        ChannelKind::Nextcloud => Err(not_configured("Nextcloud Talk", "the NEXTCLOUD_* settings")),
    }
}

/// A refusal of the request's `channel`: this server cannot send there.
fn not_configured(channel: &str, settings: &str) -> CronError {
    CronError::invalid(
        "channel",
        format!(
            "{channel} is not configured on this server (set {settings}), so a job cannot send \
             to it"
        ),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    const RULES: Rules =
        Rules { default_timezone: Tz::UTC, shortest_interval: ShortestInterval::OneMinute };

    fn changes(channel: &str, target: &str) -> JobChanges {
        JobChanges {
            schedule: Some("0 8 * * *".into()),
            prompt: Some("  Weather today?  ".into()),
            channel: Some(channel.into()),
            target: Some(target.into()),
            ..JobChanges::default()
        }
    }

    /// The request field a refused draft is refused for.
    fn field(c: JobChanges) -> &'static str {
        let refused = match merge_changes(c, None) {
            Ok(spec) => check_spec(spec, RULES).unwrap_err(),
            Err(e) => e,
        };
        match refused {
            CronError::Invalid { field, .. } => field,
            other => panic!("not a refusal of a field: {other}"),
        }
    }

    fn fail(c: JobChanges) -> String {
        match merge_changes(c, None) {
            Ok(spec) => check_spec(spec, RULES).unwrap_err().to_string(),
            Err(e) => e.to_string(),
        }
    }

    #[test]
    fn drafts_get_defaults_and_normalised_fields() {
        let spec = check_spec(
            merge_changes(changes("whatsapp", "+33 6 12-34-56-78"), None).unwrap(),
            RULES,
        )
        .unwrap();
        assert_eq!(spec.target, "33612345678");
        assert_eq!(spec.tier.as_deref(), Some("main"));
        assert_eq!(spec.name, "Weather today?");
        assert!(spec.enabled);
        assert_eq!(spec.timezone, None);
    }

    /// A prompt of control or invisible characters only asks nothing: refused by name, as
    /// a chat message of them is (it was stored and sent to the model at every run).
    #[test]
    fn a_prompt_with_nothing_to_read_is_refused() {
        for blank in ["\u{0}", " \u{0} \u{1b} ", "\u{200b}\u{feff}"] {
            let mut c = changes("nextcloud", "abc123");
            c.prompt = Some(blank.into());
            assert_eq!(field(c.clone()), "prompt", "{blank:?}");
            assert!(fail(c).contains("`prompt` is required"), "{blank:?}");
        }
    }

    #[test]
    fn a_name_with_nothing_to_read_is_the_start_of_the_prompt() {
        for blank in ["", "\u{0}", " \u{200b} "] {
            let mut c = changes("nextcloud", "abc123");
            c.name = Some(blank.into());
            let spec = check_spec(merge_changes(c, None).unwrap(), RULES).unwrap();
            assert_eq!(spec.name, "Weather today?", "{blank:?}");
        }
    }

    /// A reminder's text edited through the API is held to what the reminders tool stores:
    /// no bidi overrides or control characters reach the channel.
    #[test]
    fn an_edited_reminder_text_loses_control_and_reordering_characters() {
        let reminder = JobSpec {
            kind: JobKind::Reminder,
            ..merge_changes(changes("nextcloud", "abc123"), None).unwrap()
        };
        let edit = JobChanges {
            prompt: Some(" call \u{202e}4321\u{202c}\u{0} now\r\n".into()),
            ..JobChanges::default()
        };
        let spec = check_spec(merge_changes(edit, Some(reminder.clone())).unwrap(), RULES);
        assert_eq!(spec.unwrap().prompt, "call 4321 now");
        let edit = JobChanges { prompt: Some("\u{202e}\u{0}".into()), ..JobChanges::default() };
        let refused = check_spec(merge_changes(edit, Some(reminder)).unwrap(), RULES);
        assert!(refused.unwrap_err().to_string().contains("the text of the reminder"));
        // A prompt job's prompt is the model's to read: only trimmed.
        let edit = JobChanges { prompt: Some(" a \u{202e}b ".into()), ..JobChanges::default() };
        let prompt_job = merge_changes(changes("nextcloud", "abc123"), None).unwrap();
        let spec = check_spec(merge_changes(edit, Some(prompt_job)).unwrap(), RULES);
        assert_eq!(spec.unwrap().prompt, "a \u{202e}b");
    }

    #[test]
    fn bad_drafts_are_refused_with_a_reason() {
        assert!(fail(changes("telegram", "x")).contains("unknown channel"));
        assert!(fail(changes("webchat", " ")).contains("`target` is required"));
        assert!(fail(changes("whatsapp", "call me")).contains("not a WhatsApp number"));
        let mut c = changes("nextcloud", "abc123");
        c.tier = Some(Some("huge".into()));
        assert!(fail(c).contains("unknown tier"));
        let mut c = changes("nextcloud", "abc123");
        c.timezone = Some(Some("Paris".into()));
        assert!(fail(c).contains("unknown time zone"));
    }

    #[test]
    fn sizes_are_limited_at_the_boundary() {
        let mut c = changes("nextcloud", "abc123");
        c.prompt = Some("p".repeat(MAX_PROMPT_CHARS));
        c.name = Some("n".repeat(MAX_NAME_CHARS));
        assert!(check_spec(merge_changes(c.clone(), None).unwrap(), RULES).is_ok());
        let mut long = c.clone();
        long.prompt = Some("p".repeat(MAX_PROMPT_CHARS + 1));
        assert_eq!(fail(long), "`prompt` is longer than 4000 characters");
        let mut long = c.clone();
        long.name = Some("n".repeat(MAX_NAME_CHARS + 1));
        assert_eq!(fail(long), "`name` is longer than 100 characters");
        let mut long = c.clone();
        long.target = Some("a".repeat(65));
        assert_eq!(fail(long), "`target` is longer than 64 characters");
        let mut long = c;
        long.schedule = Some(format!("0 8 * * {}", "1,".repeat(100)));
        assert!(fail(long).contains("longer than 200 characters"));
    }

    #[test]
    fn edits_keep_what_they_do_not_name() {
        let base =
            check_spec(merge_changes(changes("nextcloud", "room1"), None).unwrap(), RULES).unwrap();
        let edit = JobChanges { enabled: Some(false), ..JobChanges::default() };
        let edited = check_spec(merge_changes(edit, Some(base.clone())).unwrap(), RULES).unwrap();
        assert_eq!(edited, JobSpec { enabled: false, ..base.clone() });
        let reset = JobChanges { tier: Some(None), ..JobChanges::default() };
        let mut cloud = base.clone();
        cloud.tier = Some("code".into());
        let edited = check_spec(merge_changes(reset, Some(cloud)).unwrap(), RULES).unwrap();
        assert_eq!(edited.tier.as_deref(), Some("main"));
    }

    #[test]
    fn one_shots_are_stored_canonically_and_must_be_ahead_when_enabled() {
        let mut c = changes("nextcloud", "room1");
        c.schedule = Some("  AT 2999-01-02T03:04 ".into());
        let spec = check_spec(merge_changes(c.clone(), None).unwrap(), RULES).unwrap();
        assert_eq!(spec.schedule, "at 2999-01-02 03:04");
        c.schedule = Some("at 2001-01-02 03:04".into());
        let err = fail(c.clone());
        assert!(err.contains("is in the past: it is now"), "{err}");
        // A disabled one-shot whose time went by can still be edited.
        c.enabled = Some(false);
        assert!(check_spec(merge_changes(c, None).unwrap(), RULES).is_ok());
    }

    #[test]
    fn each_refusal_names_its_request_field() {
        let with = |edit: fn(&mut JobChanges)| {
            let mut c = changes("nextcloud", "abc123");
            edit(&mut c);
            c
        };
        assert_eq!(field(with(|c| c.schedule = Some("0 25 * * *".into()))), "schedule");
        assert_eq!(field(with(|c| c.schedule = Some(" ".into()))), "schedule");
        assert_eq!(field(with(|c| c.schedule = Some("at 2001-01-02 03:04".into()))), "schedule");
        assert_eq!(field(with(|c| c.timezone = Some(Some("Paris".into())))), "timezone");
        assert_eq!(field(with(|c| c.prompt = Some("  ".into()))), "prompt");
        assert_eq!(field(with(|c| c.prompt = Some("p".repeat(MAX_PROMPT_CHARS + 1)))), "prompt");
        assert_eq!(field(with(|c| c.name = Some("n".repeat(MAX_NAME_CHARS + 1)))), "name");
        assert_eq!(field(with(|c| c.channel = Some("telegram".into()))), "channel");
        assert_eq!(field(with(|c| c.channel = None)), "channel");
        assert_eq!(field(with(|c| c.target = Some("room 1".into()))), "target");
        assert_eq!(field(with(|c| c.tier = Some(Some("huge".into())))), "tier");
    }

    #[test]
    fn an_enabled_job_runs_at_most_once_a_minute() {
        let with = |schedule: &str, enabled: bool| {
            let mut c = changes("nextcloud", "abc123");
            c.schedule = Some(schedule.into());
            c.enabled = Some(enabled);
            check_spec(merge_changes(c, None).unwrap(), RULES)
        };
        for schedule in ["* * * * * *", "*/5 * * * * *", "0,30 * * * * *"] {
            let refused = with(schedule, true).unwrap_err();
            assert!(matches!(refused, CronError::Invalid { field: "schedule", .. }), "{refused}");
            assert!(refused.to_string().contains("shortest interval"), "{refused}");
            // Disabled too: no job could ever run on it.
            let refused = with(schedule, false).unwrap_err();
            assert!(matches!(refused, CronError::Invalid { field: "schedule", .. }), "{refused}");
        }
        for schedule in ["30 * * * * *", "0 * * * * *", "* * * * *"] {
            assert!(with(schedule, true).is_ok(), "{schedule}");
        }
        let tests = Rules { shortest_interval: ShortestInterval::OneSecond, ..RULES };
        let mut c = changes("nextcloud", "abc123");
        c.schedule = Some("* * * * * *".into());
        assert!(check_spec(merge_changes(c, None).unwrap(), tests).is_ok());
    }
}
