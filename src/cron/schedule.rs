//! Schedules and time zones: cron expressions (5 or 6 fields, `@nicknames`) with the errors
//! that say which field is wrong, one-shot times (`at 2026-11-27 09:00`, a local date-time
//! in the job's zone), occurrences in a job's own zone, and the schedule in words.
//! Pure functions of their inputs and the clock: no database, no scheduler, no HTTP.
//!
//! Clock changes. Every occurrence is strictly after the instant asked about. An expression
//! with a restricted hour field (`30 2 * * *`, `0 9-17 * * 1-5`) names wall-clock times, and
//! each runs once: a time the clocks pass twice (going back) at its first pass only, as
//! cronie does, and a time they skip (going forward) at the first instant after the jump
//! (`30 2 * * *` at 03:00 when 02:00 becomes 03:00; several skipped times make one run), as
//! a one-shot `at` does. An expression whose hour field starts with `*` (`*/20 * * * *`,
//! `@hourly`, `*/15 * * * * *`, `0 */2 * * *`), as cronie's "wildcard" jobs, or matches
//! every hour anyway (`0-23`), measures elapsed time: it runs at every instant whose local
//! reading matches, so through both passes of a repeated hour, and not in the skipped one.

use chrono::{DateTime, Duration, LocalResult, NaiveDateTime, Offset, TimeZone, Timelike, Utc};
use chrono_tz::Tz;
use croner::parser::{CronParser, Seconds, Year};
use croner::Cron;

use super::describe::OnTheClock;

/// Longest expression accepted. The longest useful one (six lists of values) is far
/// shorter; the bound keeps a pasted page out of the parser and out of error messages.
pub const MAX_EXPRESSION_CHARS: usize = 200;

/// The word that starts a one-shot schedule: `at 2026-11-27 09:00`.
pub const ONCE_PREFIX: &str = "at ";

/// A parsed schedule: a cron expression, or one local date-time.
#[derive(Debug, Clone)]
pub struct Schedule {
    kind: Kind,
}

#[derive(Debug, Clone)]
enum Kind {
    Cron {
        /// Six fields, seconds first.
        six_fields: String,
        // Boxed: croner's parse is large next to a one-shot's date-time.
        cron: Box<Cron>,
        clock: Clock,
    },
    /// Runs once, at this wall-clock time in the job's zone.
    Once(NaiveDateTime),
}

/// How a cron expression meets its zone's clock changes (see the module header).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Clock {
    /// The hour field is a value, a range or a list: wall-clock times, each run once.
    Wall,
    /// The hour field starts with `*` or matches every hour: every instant whose local
    /// reading matches.
    Elapsed,
}

impl Schedule {
    /// Parses a 5- or 6-field expression, an `@nickname`, or a one-shot `at YYYY-MM-DD
    /// HH:MM[:SS]`; the error says what is wrong.
    pub fn parse(expression: &str) -> Result<Schedule, String> {
        if expression.chars().count() > MAX_EXPRESSION_CHARS {
            return Err(format!(
                "the schedule is longer than {MAX_EXPRESSION_CHARS} characters: write a cron \
                 expression such as `0 8 * * *`"
            ));
        }
        let trimmed = expression.trim();
        if let Some(rest) = strip_prefix_ignore_case(trimmed, ONCE_PREFIX.trim_end()) {
            return parse_local_time(rest).map(|at| Schedule { kind: Kind::Once(at) });
        }
        let six_fields = to_six_fields(expression)?;
        match parse_six_fields(&six_fields) {
            Some(cron) => {
                let clock = clock_of(&six_fields, &cron);
                Ok(Schedule { kind: Kind::Cron { six_fields, cron: Box::new(cron), clock } })
            }
            None => Err(explain_invalid(expression, &six_fields)),
        }
    }

    /// `parse`, and makes sure the expression ever happens (`0 0 30 2 *` never does). A
    /// one-shot time is checked against the clock by `parse_upcoming`, which knows the zone.
    pub fn parse_checked(expression: &str) -> Result<Schedule, String> {
        let schedule = Schedule::parse(expression)?;
        if !schedule.is_once() && schedule.next_after(Utc::now(), Tz::UTC).is_none() {
            return Err(format!("cron expression `{}` never happens", expression.trim()));
        }
        Ok(schedule)
    }

    /// `parse_checked`, and a one-shot time must still be ahead in `timezone`: a time in the
    /// past is refused with the current local time, so the person can correct it.
    pub fn parse_upcoming(expression: &str, timezone: Tz) -> Result<Schedule, String> {
        let schedule = Schedule::parse_checked(expression)?;
        if let Kind::Once(at) = schedule.kind {
            let now = Utc::now();
            if schedule.next_after(now, timezone).is_none() {
                let local_now = now.with_timezone(&timezone).format("%Y-%m-%d %H:%M");
                return Err(format!(
                    "`at {}` is in the past: it is now {local_now} in {}",
                    at.format(ONCE_FORMAT_MINUTES),
                    timezone.name()
                ));
            }
        }
        Ok(schedule)
    }

    /// Refuses a cron expression that runs more than once a minute: one whose seconds field
    /// has more than one value (`* * * * * *`, `*/5 * * * * *`, `0,30 * * * * *`), so that
    /// some of its runs are less than a minute apart. A fixed seconds field (`30 * * * * *`)
    /// runs once a minute at most, as 5 fields do.
    pub fn check_once_a_minute(&self) -> Result<(), String> {
        let Kind::Cron { six_fields, cron, .. } = &self.kind else {
            return Ok(());
        };
        let seconds = (0..60).filter(|s| cron.pattern.second_match(*s).unwrap_or(false)).count();
        if seconds <= 1 {
            return Ok(());
        }
        let fields: Vec<&str> = six_fields.split(' ').collect();
        let words = match fields.as_slice() {
            &[second, minute, hour, dom, month, dow] => {
                super::describe::fields(second, minute, hour, dom, month, dow)
            }
            _ => format!("{seconds} times a minute"),
        };
        Err(format!(
            "`{six_fields}` runs more than once a minute ({words}): the shortest interval \
             between a job's runs is one minute. Write 5 fields (`* * * * *` is every minute), \
             or give the seconds field a single value (`30 * * * * *`)"
        ))
    }

    /// Whether this is a one-shot `at …` schedule.
    pub fn is_once(&self) -> bool {
        matches!(self.kind, Kind::Once(_))
    }

    /// The schedule as it is stored: a cron expression with its fields separated by single
    /// spaces as written, or `at YYYY-MM-DD HH:MM` (`:SS` only when not zero).
    pub fn canonical(&self, written: &str) -> String {
        match &self.kind {
            Kind::Cron { .. } => written.split_whitespace().collect::<Vec<_>>().join(" "),
            Kind::Once(at) => format!("{ONCE_PREFIX}{}", format_local(*at)),
        }
    }

    /// The expression with its seconds field, nicknames expanded; a one-shot's canonical form.
    pub fn six_fields(&self) -> String {
        match &self.kind {
            Kind::Cron { six_fields, .. } => six_fields.clone(),
            Kind::Once(at) => format!("{ONCE_PREFIX}{}", format_local(*at)),
        }
    }

    /// The first occurrence strictly after `after`, in the zone `timezone` (clock changes as
    /// the module header says).
    pub fn next_after(&self, after: DateTime<Utc>, timezone: Tz) -> Option<DateTime<Utc>> {
        match &self.kind {
            Kind::Cron { cron, clock: Clock::Wall, .. } => {
                next_wall_clock(cron, whole_second(after), timezone)
            }
            Kind::Cron { cron, clock: Clock::Elapsed, .. } => {
                next_elapsed(cron, whole_second(after), timezone)
            }
            Kind::Once(at) => once_instant(*at, timezone).filter(|t| *t > after),
        }
    }

    /// The latest occurrence at or before `at`, in the zone `timezone`: the same occurrences
    /// as `next_after`'s, searched backwards.
    pub fn latest_at_or_before(&self, at: DateTime<Utc>, timezone: Tz) -> Option<DateTime<Utc>> {
        match &self.kind {
            Kind::Cron { cron, clock: Clock::Wall, .. } => {
                latest_wall_clock(cron, whole_second(at), timezone)
            }
            Kind::Cron { cron, clock: Clock::Elapsed, .. } => {
                latest_elapsed(cron, whole_second(at), timezone)
            }
            Kind::Once(once) => once_instant(*once, timezone).filter(|t| *t <= at),
        }
    }

    /// The one-shot's instant in `timezone`, whether past or not; `None` for cron schedules.
    pub fn once_at(&self, timezone: Tz) -> Option<DateTime<Utc>> {
        match &self.kind {
            Kind::Once(at) => once_instant(*at, timezone),
            Kind::Cron { .. } => None,
        }
    }

    /// The next `count` occurrences after `after`.
    pub fn upcoming(&self, after: DateTime<Utc>, timezone: Tz, count: usize) -> Vec<DateTime<Utc>> {
        let mut times = Vec::with_capacity(count);
        let mut cursor = after;
        while times.len() < count {
            match self.next_after(cursor, timezone) {
                Some(next) => {
                    times.push(next);
                    cursor = next;
                }
                None => break,
            }
        }
        times
    }

    /// The expression in words, with the zone when the zone matters ("every day at 08:00
    /// Europe/Paris", "every 5 seconds"). The one describer: the page shows what the API
    /// returns.
    pub fn describe(&self, timezone: Tz) -> String {
        let six_fields = match &self.kind {
            Kind::Cron { six_fields, .. } => six_fields,
            Kind::Once(at) => {
                // The words give the time it will run, which a clock change may move.
                let on_the_clock = match timezone.from_local_datetime(at) {
                    LocalResult::Single(_) => OnTheClock::Once,
                    LocalResult::Ambiguous(..) => OnTheClock::Twice,
                    LocalResult::None => match once_instant(*at, timezone) {
                        Some(runs) => OnTheClock::Skipped {
                            runs: runs.with_timezone(&timezone).naive_local(),
                        },
                        None => OnTheClock::Once,
                    },
                };
                return super::describe::once(*at, on_the_clock, timezone.name());
            }
        };
        let fields: Vec<&str> = six_fields.split(' ').collect();
        let &[second, minute, hour, dom, month, dow] = fields.as_slice() else {
            return six_fields.clone();
        };
        let words = super::describe::fields(second, minute, hour, dom, month, dow);
        // The zone only matters once the hour or the day is fixed.
        let zone_matters = ![hour, dom, month, dow].into_iter().all(super::describe::is_star);
        if zone_matters {
            format!("{words} {}", timezone.name())
        } else {
            words
        }
    }
}

/// Parses an IANA zone name, with a message that says what to write instead.
pub fn parse_timezone(name: &str) -> Result<Tz, String> {
    name.trim().parse::<Tz>().map_err(|_| {
        let shown: String = name.chars().take(64).collect();
        format!("unknown time zone `{shown}`: use an IANA name such as Europe/Paris or UTC")
    })
}

/// The system's zone: `TZ`, else `/etc/timezone`, else the target of `/etc/localtime`,
/// else UTC.
pub fn system_timezone() -> Tz {
    let from_env = std::env::var("TZ").ok().map(|tz| tz.trim_start_matches(':').to_string());
    let from_file = || std::fs::read_to_string("/etc/timezone").ok();
    let from_link = || {
        let target = std::fs::read_link("/etc/localtime").ok()?;
        let target = target.to_string_lossy().into_owned();
        target.split_once("zoneinfo/").map(|(_, name)| name.to_string())
    };
    [from_env, from_file(), from_link()]
        .into_iter()
        .flatten()
        .find_map(|name| name.trim().parse::<Tz>().ok())
        .unwrap_or(Tz::UTC)
}

/// `at` times as written back: minutes, or seconds when a test or an API client gave them.
const ONCE_FORMAT_MINUTES: &str = "%Y-%m-%d %H:%M";
const ONCE_FORMAT_SECONDS: &str = "%Y-%m-%d %H:%M:%S";

fn format_local(at: NaiveDateTime) -> String {
    at.format(if at.second() == 0 { ONCE_FORMAT_MINUTES } else { ONCE_FORMAT_SECONDS }).to_string()
}

fn strip_prefix_ignore_case<'a>(text: &'a str, prefix: &str) -> Option<&'a str> {
    let head = text.get(..prefix.len())?;
    let rest = &text[prefix.len()..];
    (head.eq_ignore_ascii_case(prefix)
        && (rest.is_empty() || rest.starts_with(char::is_whitespace)))
    .then(|| rest.trim())
}

/// A local date-time: `YYYY-MM-DD HH:MM`, with an optional `:SS`, and `T` accepted in place
/// of the space (ISO 8601 as tools write it).
pub fn parse_local_time(text: &str) -> Result<NaiveDateTime, String> {
    let text = text.trim();
    let normalised = text.replacen('T', " ", 1);
    for format in [ONCE_FORMAT_MINUTES, ONCE_FORMAT_SECONDS] {
        if let Ok(at) = NaiveDateTime::parse_from_str(&normalised, format) {
            return Ok(at.with_nanosecond(0).unwrap_or(at));
        }
    }
    let shown: String = text.chars().take(40).collect();
    Err(format!(
        "`{shown}` is not a date and time: write YYYY-MM-DD HH:MM in 24-hour time, e.g. \
         `at 2026-11-27 09:00`"
    ))
}

/// A wall-clock time in `timezone` as an instant. A time that happens twice (clocks going
/// back) is the first one; a time skipped by clocks going forward is the first instant
/// after the gap, so a reminder in the gap still fires, as late as it must.
fn once_instant(at: NaiveDateTime, timezone: Tz) -> Option<DateTime<Utc>> {
    first_instant_reading(timezone, at)
}

/// The first instant whose reading in `timezone` is `local` or later: `local`'s instant, the
/// first of its two when the clocks go back over it, or the instant the clocks jump over it
/// (the end of the gap) when they go forward. This is every `Clock::Wall` occurrence.
fn first_instant_reading(timezone: Tz, local: NaiveDateTime) -> Option<DateTime<Utc>> {
    if let Some(t) = timezone.from_local_datetime(&local).earliest() {
        return Some(t.with_timezone(&Utc));
    }
    // Skipped: the clocks jumped from the offset before to the one after, at an instant
    // between `local` read at the offset after (before the jump) and at the one before
    // (after it). No offset is a day or more, and no zone changes twice within two days.
    let plain = Utc.from_utc_datetime(&local);
    let offset_before = offset_at(timezone, plain - Duration::days(1));
    let offset_after = offset_at(timezone, plain + Duration::days(1));
    offset_change(timezone, plain - offset_after, plain - offset_before)
}

/// `next_after` for `Clock::Wall`: the first matching reading whose instant (as
/// `first_instant_reading` gives it) is after `after`. A reading up to the one at `after`
/// has its instant at or before `after`, so the search starts there; a later one may too
/// (the first pass of a repeated hour, when `after` is in the second), and is passed over.
fn next_wall_clock(cron: &Cron, after: DateTime<Utc>, timezone: Tz) -> Option<DateTime<Utc>> {
    let mut local = after.with_timezone(&timezone).naive_local();
    loop {
        local = next_match(cron, local, false)?;
        // A reading no instant can be found for (no zone has one) is passed over, not taken
        // for the end of the schedule.
        let Some(instant) = first_instant_reading(timezone, local) else { continue };
        if instant > after {
            return Some(instant);
        }
    }
}

/// `latest_at_or_before` for `Clock::Wall`. A reading later than the one at `at` may have had
/// its instant already (the first pass of a repeated hour, when `at` is in the second), so the
/// search starts from the latest reading shown up to `at`: `at` at the larger of its offset
/// and the one three hours before (clocks never go back more than that).
fn latest_wall_clock(cron: &Cron, at: DateTime<Utc>, timezone: Tz) -> Option<DateTime<Utc>> {
    let offset = offset_at(timezone, at).max(offset_at(timezone, at - Duration::hours(3)));
    let mut local = at.naive_utc() + offset;
    let mut inclusive = true;
    loop {
        local = previous_match(cron, local, inclusive)?;
        inclusive = false;
        let Some(instant) = first_instant_reading(timezone, local) else { continue };
        if instant <= at {
            return Some(instant);
        }
    }
}

/// `next_after` for `Clock::Elapsed`: the first instant after `after` whose reading matches.
/// Within a stretch of one offset readings and instants move together, so the first match is
/// found on the readings; when the offset changes before it, the search starts again from
/// the change, at the new offset.
fn next_elapsed(cron: &Cron, after: DateTime<Utc>, timezone: Tz) -> Option<DateTime<Utc>> {
    let mut from = after + Duration::seconds(1);
    loop {
        let offset = offset_at(timezone, from);
        let local = next_match(cron, from.naive_utc() + offset, true)?;
        let found = Utc.from_utc_datetime(&(local - offset));
        match offset_change(timezone, from, found) {
            None => return Some(found),
            Some(change) => from = change,
        }
    }
}

/// `latest_at_or_before` for `Clock::Elapsed`: `next_elapsed` backwards.
fn latest_elapsed(cron: &Cron, at: DateTime<Utc>, timezone: Tz) -> Option<DateTime<Utc>> {
    let mut until = at;
    loop {
        let offset = offset_at(timezone, until);
        let local = previous_match(cron, until.naive_utc() + offset, true)?;
        let found = Utc.from_utc_datetime(&(local - offset));
        match offset_change(timezone, until, found) {
            None => return Some(found),
            Some(change) => until = change,
        }
    }
}

/// How an expression meets clock changes. As cronie decides it, an hour field written with a
/// leading `*` (`*`, `*/2`, `*/3`) is a "wildcard" that measures elapsed time; so does one
/// that matches every hour anyway (`0-23`). Any other hour field (a value, a range, a list)
/// names wall-clock times.
fn clock_of(six_fields: &str, cron: &Cron) -> Clock {
    let hour = six_fields.split(' ').nth(2).unwrap_or_default();
    if hour.starts_with('*') || (0..24).all(|hour| cron.pattern.hour_match(hour).unwrap_or(false)) {
        Clock::Elapsed
    } else {
        Clock::Wall
    }
}

/// The first reading after `local` (or at it, when `inclusive`) that the fields match, on a
/// clock that never changes: croner on UTC, so its own handling of clock changes (which took
/// any gap it crossed for the job's time, and a repeated hour's first pass when asked from
/// the second) never applies; the zone is this module's to apply.
fn next_match(cron: &Cron, local: NaiveDateTime, inclusive: bool) -> Option<NaiveDateTime> {
    let plain = Utc.from_utc_datetime(&local);
    cron.find_next_occurrence(&plain, inclusive).ok().map(|t| t.naive_utc())
}

/// `next_match` backwards.
fn previous_match(cron: &Cron, local: NaiveDateTime, inclusive: bool) -> Option<NaiveDateTime> {
    let plain = Utc.from_utc_datetime(&local);
    cron.find_previous_occurrence(&plain, inclusive).ok().map(|t| t.naive_utc())
}

/// `timezone`'s offset from UTC at `at`.
fn offset_at(timezone: Tz, at: DateTime<Utc>) -> Duration {
    let offset = timezone.offset_from_utc_datetime(&at.naive_utc()).fix();
    Duration::seconds(offset.local_minus_utc().into())
}

/// How far apart `offset_change` looks first: zones change their offset months apart, so a
/// change and its undoing never fit between two looks.
const OFFSET_LOOK: Duration = Duration::hours(6);

/// Going from `from` towards `to` (either way, whole seconds), the first instant whose offset
/// differs from the one at `from`, to the second; `None` when it stays the same up to `to`.
fn offset_change(timezone: Tz, from: DateTime<Utc>, to: DateTime<Utc>) -> Option<DateTime<Utc>> {
    let offset = offset_at(timezone, from);
    let step = if to >= from { OFFSET_LOOK } else { -OFFSET_LOOK };
    let mut same = from;
    loop {
        let look = if (to - same).abs() <= OFFSET_LOOK { to } else { same + step };
        if offset_at(timezone, look) != offset {
            let mut differs = look;
            while (differs - same).abs() > Duration::seconds(1) {
                let middle = same + Duration::seconds((differs - same).num_seconds() / 2);
                if offset_at(timezone, middle) == offset {
                    same = middle;
                } else {
                    differs = middle;
                }
            }
            return Some(differs);
        }
        if look == to {
            return None;
        }
        same = look;
    }
}

fn to_six_fields(expression: &str) -> Result<String, String> {
    let fields: Vec<&str> = expression.split_whitespace().collect();
    match fields.as_slice() {
        [] => Err("the schedule is empty: write a cron expression such as `0 8 * * *` (every \
                   day at 08:00)"
            .into()),
        [nickname] if nickname.starts_with('@') => {
            let six = match nickname.to_ascii_lowercase().as_str() {
                "@yearly" | "@annually" => "0 0 0 1 1 *",
                "@monthly" => "0 0 0 1 * *",
                "@weekly" => "0 0 0 * * 0",
                "@daily" | "@midnight" => "0 0 0 * * *",
                "@hourly" => "0 0 * * * *",
                _ => {
                    return Err(format!(
                        "unknown schedule `{nickname}`: use @hourly, @daily, @weekly, @monthly, \
                         @yearly or a cron expression"
                    ))
                }
            };
            Ok(six.to_string())
        }
        [_, _, _, _, _] => Ok(format!("0 {}", fields.join(" "))),
        [_, _, _, _, _, _] => Ok(fields.join(" ")),
        _ => Err(format!(
            "cron expression `{}` has {} fields: write 5 (minute hour day-of-month month \
             day-of-week) or 6 (a seconds field first)",
            expression.trim(),
            fields.len()
        )),
    }
}

/// croner's parse of exactly six fields; `None` when it rejects the expression. When both
/// day-of-month and day-of-week are restricted a day must match both (`dom_and_dow`), the
/// rule this scheduler has always had, unlike Vixie cron where either one is enough.
fn parse_six_fields(six_fields: &str) -> Option<Cron> {
    CronParser::builder()
        .seconds(Seconds::Required)
        .year(Year::Disallowed)
        .dom_and_dow(true)
        .build()
        .parse(&sunday_as_zero(six_fields))
        .ok()
}

/// `six_fields` with `7L` (the last Sunday, 7 being Sunday as 0 is) written `0L` in the
/// day-of-week field. croner 3.0 moves the 7 of every other form to 0 (`7`, `7#2`, `5-7`)
/// but not the last-of-month one, which then matches no day: `0 9 * * 7L` was refused as
/// never happening, and `1L,7L` ran on the last Mondays only.
fn sunday_as_zero(six_fields: &str) -> String {
    let Some((before, dow)) = six_fields.rsplit_once(' ') else {
        return six_fields.to_string();
    };
    let parts: Vec<&str> = dow
        .split(',')
        .map(|part| if part.eq_ignore_ascii_case("7L") { "0L" } else { part })
        .collect();
    format!("{before} {}", parts.join(","))
}

/// Finds the first field the parser rejects on its own, to say which one is wrong.
fn explain_invalid(expression: &str, six_fields: &str) -> String {
    const FIELDS: [(&str, &str); 6] = [
        ("second", "0-59"),
        ("minute", "0-59"),
        ("hour", "0-23"),
        ("day-of-month", "1-31, L, or a day with W such as 15W"),
        ("month", "1-12 or JAN-DEC"),
        ("day-of-week", "0-7 or SUN-SAT, where 0 and 7 are Sunday"),
    ];
    let fields: Vec<&str> = six_fields.split(' ').collect();
    for (index, value) in fields.iter().enumerate() {
        let mut probe = ["*"; 6];
        probe[index] = value;
        if parse_six_fields(&probe.join(" ")).is_none() {
            let (name, allowed) = FIELDS[index];
            return format!(
                "invalid cron expression `{}`: the {name} field `{value}` is not valid ({allowed})",
                expression.trim()
            );
        }
    }
    format!("invalid cron expression `{}`", expression.trim())
}

/// croner carries sub-second parts into the times it finds; occurrences are whole seconds.
fn whole_second(time: DateTime<Utc>) -> DateTime<Utc> {
    time.with_nanosecond(0).unwrap_or(time)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn utc(s: &str) -> DateTime<Utc> {
        DateTime::parse_from_rfc3339(s).unwrap().with_timezone(&Utc)
    }

    fn check_next(expression: &str, timezone: &str, after: &str, expected: &str) {
        let schedule = Schedule::parse(expression).unwrap();
        let tz = parse_timezone(timezone).unwrap();
        let next = schedule.next_after(utc(after), tz).unwrap();
        assert_eq!(next, utc(expected), "{expression} in {timezone} after {after}");
    }

    /// The next occurrences of `expression` in `timezone` after `after` (RFC 3339), each as
    /// `MM-DD HH:MM:SS ±HH:MM` in the zone. Also checks that each is strictly after the one
    /// before, and that searching backwards from just before each finds the one before it
    /// (the first: nothing after `after`), so both directions agree on the same occurrences.
    fn check_runs(expression: &str, timezone: Tz, after: &str, expected: &[&str]) {
        let schedule = Schedule::parse(expression).unwrap();
        let after = DateTime::parse_from_rfc3339(after).unwrap().with_timezone(&Utc);
        let runs = schedule.upcoming(after, timezone, expected.len());
        let shown: Vec<String> = runs
            .iter()
            .map(|t| t.with_timezone(&timezone).format("%m-%d %H:%M:%S %:z").to_string())
            .collect();
        assert_eq!(shown, expected, "{expression} in {timezone} after {after}");
        let mut previous = after;
        for run in runs {
            assert!(run > previous, "{expression}: {run} is not after {previous}");
            let before = run - chrono::Duration::seconds(1);
            let latest = schedule.latest_at_or_before(before, timezone);
            if previous == after {
                assert!(latest.is_none_or(|t| t <= after), "{expression}: {latest:?} before {run}");
            } else {
                assert_eq!(latest, Some(previous), "{expression}: the occurrence before {run}");
            }
            assert_eq!(schedule.latest_at_or_before(run, timezone), Some(run), "{expression}");
            previous = run;
        }
    }

    fn check_invalid(expression: &str, expected_part: &str) {
        let err = Schedule::parse_checked(expression).unwrap_err();
        assert!(err.contains(expected_part), "{expression}: {err}");
    }

    #[test]
    fn five_and_six_field_expressions() {
        assert_eq!(Schedule::parse("0 8 * * *").unwrap().six_fields(), "0 0 8 * * *");
        assert_eq!(Schedule::parse(" */2  * * * * * ").unwrap().six_fields(), "*/2 * * * * *");
        assert_eq!(Schedule::parse("@daily").unwrap().six_fields(), "0 0 0 * * *");
        check_next("*/2 * * * * *", "UTC", "2026-01-01T10:00:01Z", "2026-01-01T10:00:02Z");
        check_next("*/2 * * * * *", "UTC", "2026-01-01T10:00:02.5Z", "2026-01-01T10:00:04Z");
        check_next("30 7 * * 1-5", "UTC", "2026-01-02T08:00:00Z", "2026-01-05T07:30:00Z");
    }

    #[test]
    fn day_of_month_and_day_of_week_must_both_match() {
        // The 13th that is a Friday: 2026-02-13, then 2026-03-13.
        check_next("0 9 13 * 5", "UTC", "2026-01-01T00:00:00Z", "2026-02-13T09:00:00Z");
        check_next("0 9 13 * 5", "UTC", "2026-02-14T00:00:00Z", "2026-03-13T09:00:00Z");
    }

    #[test]
    fn time_zones_follow_daylight_saving() {
        // Paris is UTC+1 in winter and UTC+2 in summer (from 2026-03-29).
        check_next("0 8 * * *", "Europe/Paris", "2026-01-10T12:00:00Z", "2026-01-11T07:00:00Z");
        check_next("0 8 * * *", "Europe/Paris", "2026-03-28T12:00:00Z", "2026-03-29T06:00:00Z");
        check_next("0 8 * * *", "America/New_York", "2026-06-01T00:00:00Z", "2026-06-01T12:00:00Z");
        // The offset at each occurrence is the zone's offset then, not when asked.
        let schedule = Schedule::parse("0 8 * * *").unwrap();
        let runs = schedule.upcoming(utc("2026-03-27T12:00:00Z"), Tz::Europe__Paris, 3);
        let hours: Vec<u32> = runs.iter().map(|t| t.hour()).collect();
        assert_eq!(hours, [7, 6, 6], "{runs:?}");
    }

    // Europe/Berlin in 2027: clocks go forward on 28 March at 02:00 CET (01:00 UTC) to 03:00
    // CEST, and back on 31 October at 03:00 CEST (01:00 UTC) to 02:00 CET.
    const BERLIN: Tz = Tz::Europe__Berlin;

    #[test]
    fn wall_clock_times_run_once_a_day_when_clocks_go_forward() {
        // Times before the gap run once, at their time, with no extra run when it ends.
        let eve = "2027-03-27T22:30:00Z";
        check_runs(
            "59 1 * * *",
            BERLIN,
            eve,
            &["03-28 01:59:00 +01:00", "03-29 01:59:00 +02:00", "03-30 01:59:00 +02:00"],
        );
        check_runs("0 1 * * *", BERLIN, eve, &["03-28 01:00:00 +01:00", "03-29 01:00:00 +02:00"]);
        check_runs("10 1 * * *", BERLIN, eve, &["03-28 01:10:00 +01:00", "03-29 01:10:00 +02:00"]);
        check_runs(
            "30 59 1 * * *",
            BERLIN,
            eve,
            &["03-28 01:59:30 +01:00", "03-29 01:59:30 +02:00"],
        );
        // From just after a run, or a job created a minute before the gap.
        check_runs("59 1 * * *", BERLIN, "2027-03-28T01:59:00+01:00", &["03-29 01:59:00 +02:00"]);
        check_runs("58 1 * * *", BERLIN, "2027-03-28T01:58:42+01:00", &["03-29 01:58:00 +02:00"]);
        check_runs("0 1 * * *", BERLIN, "2027-03-28T01:00:00+01:00", &["03-29 01:00:00 +02:00"]);
        // A time in the gap runs once, at the first instant after it, like a one-shot.
        check_runs(
            "30 2 * * *",
            BERLIN,
            "2027-03-27T00:00:00Z",
            &["03-27 02:30:00 +01:00", "03-28 03:00:00 +02:00", "03-29 02:30:00 +02:00"],
        );
        check_runs("30 2 * * *", BERLIN, "2027-03-28T01:30:00+01:00", &["03-28 03:00:00 +02:00"]);
        check_runs("30 2 * * *", BERLIN, "2027-03-28T03:00:00+02:00", &["03-29 02:30:00 +02:00"]);
        check_runs(
            "15 30 2 * * *",
            BERLIN,
            eve,
            &["03-28 03:00:00 +02:00", "03-29 02:30:15 +02:00"],
        );
        // Every time of the gap lands on its end: one run, not three.
        check_runs(
            "*/20 2 * * *",
            BERLIN,
            eve,
            &["03-28 03:00:00 +02:00", "03-29 02:00:00 +02:00", "03-29 02:20:00 +02:00"],
        );
        check_runs("0 3 * * *", BERLIN, eve, &["03-28 03:00:00 +02:00", "03-29 03:00:00 +02:00"]);
        check_runs("0 3 * * *", BERLIN, "2027-03-28T03:00:00+02:00", &["03-29 03:00:00 +02:00"]);
    }

    #[test]
    fn wall_clock_times_run_at_the_first_pass_when_clocks_go_back() {
        let eve = "2027-10-30T22:00:00Z";
        check_runs(
            "30 2 * * *",
            BERLIN,
            eve,
            &["10-31 02:30:00 +02:00", "11-01 02:30:00 +01:00", "11-02 02:30:00 +01:00"],
        );
        // In the second pass the first 02:30 has gone by: the next is tomorrow's.
        let second_pass = "2027-10-31T02:10:00+01:00";
        check_runs("30 2 * * *", BERLIN, second_pass, &["11-01 02:30:00 +01:00"]);
        check_runs("45 2 * * *", BERLIN, second_pass, &["11-01 02:45:00 +01:00"]);
        check_runs("30 30 2 * * *", BERLIN, second_pass, &["11-01 02:30:30 +01:00"]);
        check_runs("30 2 * * *", BERLIN, "2027-10-31T02:45:00+02:00", &["11-01 02:30:00 +01:00"]);
        check_runs("59 1 * * *", BERLIN, eve, &["10-31 01:59:00 +02:00", "11-01 01:59:00 +01:00"]);
        check_runs("0 1 * * *", BERLIN, eve, &["10-31 01:00:00 +02:00", "11-01 01:00:00 +01:00"]);
        check_runs("0 3 * * *", BERLIN, eve, &["10-31 03:00:00 +01:00", "11-01 03:00:00 +01:00"]);
        check_runs("0 3 * * *", BERLIN, second_pass, &["10-31 03:00:00 +01:00"]);
        // An hour's worth of minutes runs once too, in the first pass.
        check_runs(
            "*/20 2 * * *",
            BERLIN,
            "2027-10-31T02:30:00+02:00",
            &["10-31 02:40:00 +02:00", "11-01 02:00:00 +01:00"],
        );
    }

    #[test]
    fn repeats_within_the_hour_follow_elapsed_time() {
        // Forward: the gap's minutes do not exist; runs stay 20 real minutes apart.
        check_runs(
            "*/20 * * * *",
            BERLIN,
            "2027-03-28T01:30:00+01:00",
            &[
                "03-28 01:40:00 +01:00",
                "03-28 03:00:00 +02:00",
                "03-28 03:20:00 +02:00",
                "03-28 03:40:00 +02:00",
            ],
        );
        check_runs(
            "0 * * * *",
            BERLIN,
            "2027-03-28T00:30:00+01:00",
            &["03-28 01:00:00 +01:00", "03-28 03:00:00 +02:00", "03-28 04:00:00 +02:00"],
        );
        check_runs(
            "*/15 * * * * *",
            BERLIN,
            "2027-03-28T01:59:30+01:00",
            &["03-28 01:59:45 +01:00", "03-28 03:00:00 +02:00", "03-28 03:00:15 +02:00"],
        );
        // Back: both passes of the repeated hour, in the order they happen.
        let first_pass = "2027-10-31T02:30:00+02:00";
        check_runs(
            "*/20 * * * *",
            BERLIN,
            first_pass,
            &[
                "10-31 02:40:00 +02:00",
                "10-31 02:00:00 +01:00",
                "10-31 02:20:00 +01:00",
                "10-31 02:40:00 +01:00",
                "10-31 03:00:00 +01:00",
            ],
        );
        check_runs(
            "*/20 * * * *",
            BERLIN,
            "2027-10-31T02:50:00+02:00",
            &["10-31 02:00:00 +01:00", "10-31 02:20:00 +01:00"],
        );
        check_runs(
            "*/20 * * * *",
            BERLIN,
            "2027-10-31T02:10:00+01:00",
            &["10-31 02:20:00 +01:00", "10-31 02:40:00 +01:00", "10-31 03:00:00 +01:00"],
        );
        check_runs(
            "0 * * * *",
            BERLIN,
            "2027-10-31T00:30:00+02:00",
            &[
                "10-31 01:00:00 +02:00",
                "10-31 02:00:00 +02:00",
                "10-31 02:00:00 +01:00",
                "10-31 03:00:00 +01:00",
            ],
        );
        check_runs(
            "*/15 * * * * *",
            BERLIN,
            "2027-10-31T02:59:30+02:00",
            &["10-31 02:59:45 +02:00", "10-31 02:00:00 +01:00", "10-31 02:00:15 +01:00"],
        );
    }

    #[test]
    fn an_ordinary_day_is_unchanged() {
        let morning = "2027-06-15T00:30:00+02:00";
        check_runs(
            "59 1 * * *",
            BERLIN,
            morning,
            &["06-15 01:59:00 +02:00", "06-16 01:59:00 +02:00"],
        );
        check_runs(
            "30 2 * * *",
            BERLIN,
            morning,
            &["06-15 02:30:00 +02:00", "06-16 02:30:00 +02:00"],
        );
        check_runs(
            "*/20 * * * *",
            BERLIN,
            morning,
            &["06-15 00:40:00 +02:00", "06-15 01:00:00 +02:00", "06-15 01:20:00 +02:00"],
        );
        check_runs("30 30 2 * * *", BERLIN, morning, &["06-15 02:30:30 +02:00"]);
    }

    #[test]
    fn new_york_changes_at_two_in_the_morning() {
        // 2027: 02:00 EST becomes 03:00 EDT on 14 March; 02:00 EDT becomes 01:00 EST on
        // 7 November, so 01:00-01:59 happens twice.
        let ny = Tz::America__New_York;
        check_runs(
            "59 1 * * *",
            ny,
            "2027-03-13T12:00:00Z",
            &["03-14 01:59:00 -05:00", "03-15 01:59:00 -04:00"],
        );
        check_runs(
            "30 2 * * *",
            ny,
            "2027-03-13T00:00:00-05:00",
            &["03-13 02:30:00 -05:00", "03-14 03:00:00 -04:00", "03-15 02:30:00 -04:00"],
        );
        check_runs(
            "*/20 * * * *",
            ny,
            "2027-03-14T01:30:00-05:00",
            &["03-14 01:40:00 -05:00", "03-14 03:00:00 -04:00"],
        );
        check_runs(
            "30 1 * * *",
            ny,
            "2027-11-07T00:00:00-04:00",
            &["11-07 01:30:00 -04:00", "11-08 01:30:00 -05:00"],
        );
        check_runs("30 1 * * *", ny, "2027-11-07T01:10:00-05:00", &["11-08 01:30:00 -05:00"]);
        check_runs(
            "*/20 * * * *",
            ny,
            "2027-11-07T01:30:00-04:00",
            &[
                "11-07 01:40:00 -04:00",
                "11-07 01:00:00 -05:00",
                "11-07 01:20:00 -05:00",
                "11-07 01:40:00 -05:00",
                "11-07 02:00:00 -05:00",
            ],
        );
    }

    #[test]
    fn lord_howe_moves_its_clocks_by_half_an_hour() {
        // 2027: 02:00 +10:30 becomes 02:30 +11 on 3 October; 02:00 +11 becomes 01:30 +10:30
        // on 4 April, so 01:30-01:59 happens twice.
        let lord_howe = Tz::Australia__Lord_Howe;
        check_runs(
            "59 1 * * *",
            lord_howe,
            "2027-10-03T00:00:00+10:30",
            &["10-03 01:59:00 +10:30", "10-04 01:59:00 +11:00"],
        );
        check_runs(
            "15 2 * * *",
            lord_howe,
            "2027-10-03T00:00:00+10:30",
            &["10-03 02:30:00 +11:00", "10-04 02:15:00 +11:00"],
        );
        check_runs(
            "*/20 * * * *",
            lord_howe,
            "2027-10-03T01:30:00+10:30",
            &["10-03 01:40:00 +10:30", "10-03 02:40:00 +11:00", "10-03 03:00:00 +11:00"],
        );
        check_runs(
            "45 1 * * *",
            lord_howe,
            "2027-04-04T00:00:00+11:00",
            &["04-04 01:45:00 +11:00", "04-05 01:45:00 +10:30"],
        );
        check_runs(
            "45 1 * * *",
            lord_howe,
            "2027-04-04T01:50:00+10:30",
            &["04-05 01:45:00 +10:30"],
        );
        check_runs(
            "*/20 * * * *",
            lord_howe,
            "2027-04-04T01:10:00+11:00",
            &[
                "04-04 01:20:00 +11:00",
                "04-04 01:40:00 +11:00",
                "04-04 01:40:00 +10:30",
                "04-04 02:00:00 +10:30",
                "04-04 02:20:00 +10:30",
            ],
        );
    }

    #[test]
    fn hours_with_a_leading_star_follow_elapsed_time_as_in_cronie() {
        // `*/2` is a wildcard hour, as `*` is: the skipped 02:00 does not run (no 03:00 run
        // in its place), and the repeated 02:00 runs at both passes.
        let every_2_hours = "0 */2 * * *";
        check_runs(
            every_2_hours,
            BERLIN,
            "2027-03-27T22:30:00Z",
            &["03-28 00:00:00 +01:00", "03-28 04:00:00 +02:00", "03-28 06:00:00 +02:00"],
        );
        check_runs(
            every_2_hours,
            BERLIN,
            "2027-10-30T22:00:00Z",
            &["10-31 02:00:00 +02:00", "10-31 02:00:00 +01:00", "10-31 04:00:00 +01:00"],
        );
        check_runs(
            every_2_hours,
            Tz::America__New_York,
            "2027-03-14T00:30:00-05:00",
            &["03-14 04:00:00 -04:00", "03-14 06:00:00 -04:00"],
        );
        // 02:00 EDT is never read (01:59:59 EDT becomes 01:00 EST): one 02:00, in EST.
        check_runs(
            every_2_hours,
            Tz::America__New_York,
            "2027-11-07T00:30:00-04:00",
            &["11-07 02:00:00 -05:00", "11-07 04:00:00 -05:00"],
        );
        let lord_howe = Tz::Australia__Lord_Howe;
        check_runs(
            every_2_hours,
            lord_howe,
            "2027-10-03T00:30:00+10:30",
            &["10-03 04:00:00 +11:00", "10-03 06:00:00 +11:00"],
        );
        check_runs(
            every_2_hours,
            lord_howe,
            "2027-04-04T00:30:00+11:00",
            &["04-04 02:00:00 +10:30", "04-04 04:00:00 +10:30"],
        );
        // The same hours written as a range stay wall-clock times, run once each.
        check_runs(
            "0 0-22/2 * * *",
            BERLIN,
            "2027-03-27T22:30:00Z",
            &["03-28 00:00:00 +01:00", "03-28 03:00:00 +02:00", "03-28 04:00:00 +02:00"],
        );
        check_runs(
            "0 0-22/2 * * *",
            BERLIN,
            "2027-10-30T22:00:00Z",
            &["10-31 02:00:00 +02:00", "10-31 04:00:00 +01:00"],
        );
    }

    #[test]
    fn latest_occurrence_is_inclusive() {
        let schedule = Schedule::parse("0 8 * * *").unwrap();
        let at = utc("2026-01-10T08:00:00Z");
        assert_eq!(schedule.latest_at_or_before(at, Tz::UTC), Some(at));
        let later = utc("2026-01-10T09:30:12.345Z");
        assert_eq!(schedule.latest_at_or_before(later, Tz::UTC), Some(at));
    }

    /// 7 is Sunday as 0 is, in the last-of-month form too (croner 3.0 read `7L` as no day).
    #[test]
    fn seven_l_is_the_last_sunday() {
        let after = utc("2026-11-01T00:00:00Z");
        let runs = |expression: &str| -> Vec<DateTime<Utc>> {
            Schedule::parse_checked(expression).unwrap().upcoming(after, Tz::UTC, 3)
        };
        let last_sundays =
            ["2026-11-29T09:00:00Z", "2026-12-27T09:00:00Z", "2027-01-31T09:00:00Z"].map(utc);
        assert_eq!(runs("0 9 * * 7L"), last_sundays);
        assert_eq!(runs("0 9 * * 7l"), last_sundays);
        assert_eq!(runs("0 9 * * 0L"), last_sundays);
        let with_mondays =
            ["2026-11-29T09:00:00Z", "2026-11-30T09:00:00Z", "2026-12-27T09:00:00Z"].map(utc);
        assert_eq!(runs("0 9 * * 1L,7L"), with_mondays);
        assert_eq!(
            Schedule::parse("0 9 * * 7L").unwrap().describe(Tz::UTC),
            "on the last Sunday of every month at 09:00 UTC"
        );
        // Other 7s and other fields are left as croner reads them.
        assert_eq!(sunday_as_zero("0 0 7 7 * 7#2"), "0 0 7 7 * 7#2");
        assert_eq!(sunday_as_zero("0 0 7 * * 5,7L"), "0 0 7 * * 5,0L");
    }

    #[test]
    fn invalid_expressions_say_what_is_wrong() {
        check_invalid("", "empty");
        check_invalid("* * *", "has 3 fields");
        check_invalid("1 2 3 4 5 6 7", "has 7 fields");
        check_invalid("0 25 * * *", "hour field `25`");
        check_invalid("61 * * * *", "minute field `61`");
        check_invalid("0 8 * * MOON", "day-of-week field");
        check_invalid("0 0 30 2 *", "never happens");
        check_invalid("@often", "unknown schedule");
        check_invalid(&"1,".repeat(150), "longer than 200 characters");
    }

    #[test]
    fn one_shots_happen_once_at_a_local_time() {
        let once = Schedule::parse("at 2026-11-27 09:00").unwrap();
        assert!(once.is_once());
        assert_eq!(once.canonical(" at 2026-11-27 09:00 "), "at 2026-11-27 09:00");
        let at = utc("2026-11-27T08:00:00Z");
        assert_eq!(once.next_after(utc("2026-11-27T07:59:59Z"), Tz::Europe__Paris), Some(at));
        assert_eq!(once.next_after(at, Tz::Europe__Paris), None);
        assert_eq!(once.latest_at_or_before(at, Tz::Europe__Paris), Some(at));
        assert_eq!(once.latest_at_or_before(utc("2026-11-27T07:00:00Z"), Tz::Europe__Paris), None);
        assert_eq!(once.upcoming(utc("2026-01-01T00:00:00Z"), Tz::UTC, 3).len(), 1);
        assert_eq!(
            once.describe(Tz::Europe__Paris),
            "once, on Friday 27 November 2026 at 09:00 Europe/Paris"
        );
        // `T`, seconds, and any case of `at`.
        let precise = Schedule::parse("AT 2026-11-27T09:00:05").unwrap();
        assert_eq!(precise.canonical("x"), "at 2026-11-27 09:00:05");
        assert!(precise.describe(Tz::UTC).ends_with("at 09:00:05 UTC"));
        // A time skipped by the spring change fires when the clocks resume (03:00 Paris).
        let gap = Schedule::parse("at 2026-03-29 02:30").unwrap();
        assert_eq!(gap.once_at(Tz::Europe__Paris), Some(utc("2026-03-29T01:00:00Z")));
        // A time that happens twice in autumn is the first one.
        let fold = Schedule::parse("at 2026-10-25 02:30").unwrap();
        assert_eq!(fold.once_at(Tz::Europe__Paris), Some(utc("2026-10-25T00:30:00Z")));
        // With seconds too: the first instant after the gap is 03:00:00, not 03:00:30.
        let gap_seconds = Schedule::parse("at 2027-03-28 02:30:30").unwrap();
        assert_eq!(gap_seconds.once_at(BERLIN), Some(utc("2027-03-28T01:00:00Z")));
        let at_the_end = utc("2027-03-28T01:00:00Z");
        assert_eq!(gap_seconds.next_after(utc("2027-03-28T00:59:59Z"), BERLIN), Some(at_the_end));
        assert_eq!(gap_seconds.next_after(at_the_end, BERLIN), None);
    }

    #[test]
    fn bad_or_past_one_shots_say_what_is_wrong() {
        check_invalid("at tomorrow", "not a date and time");
        check_invalid("at 2026-13-01 09:00", "not a date and time");
        check_invalid("at", "not a date and time");
        let err = Schedule::parse_upcoming("at 2001-02-03 04:05", Tz::Europe__Paris).unwrap_err();
        assert!(err.starts_with("`at 2001-02-03 04:05` is in the past: it is now "), "{err}");
        assert!(err.ends_with(" in Europe/Paris"), "{err}");
        assert!(Schedule::parse_upcoming("at 2999-02-03 04:05", Tz::UTC).is_ok());
        // `attic` is no one-shot, and no cron expression either.
        assert!(Schedule::parse("attic").unwrap_err().contains("has 1 fields"));
    }

    #[test]
    fn more_than_once_a_minute_is_told_apart() {
        for (expression, words) in [
            ("* * * * * *", "(every second)"),
            ("*/5 * * * * *", "(every 5 seconds)"),
            ("0,30 * * * * *", "`0,30 * * * * *` runs more than once a minute"),
            ("0-1 0 8 * * *", "`0-1 0 8 * * *` runs more than once a minute"),
        ] {
            let err = Schedule::parse(expression).unwrap().check_once_a_minute().unwrap_err();
            assert!(err.contains(words), "{expression}: {err}");
            assert!(err.contains("the shortest interval between a job's runs is one minute"));
        }
        for expression in [
            "30 * * * * *",
            "0 * * * * *",
            "* * * * *",
            "*/2 * * * *",
            "@hourly",
            "at 2030-01-01 09:00",
        ] {
            let schedule = Schedule::parse(expression).unwrap();
            assert_eq!(schedule.check_once_a_minute(), Ok(()), "{expression}");
        }
    }

    #[test]
    fn time_zone_names() {
        assert_eq!(parse_timezone("Europe/Paris").unwrap(), Tz::Europe__Paris);
        assert!(parse_timezone("Mars/Olympus").unwrap_err().contains("unknown time zone"));
        assert!(parse_timezone(&"x".repeat(10_000)).unwrap_err().len() < 200);
    }
}
