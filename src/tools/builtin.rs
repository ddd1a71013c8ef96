//! The built-in tools, as `app.rs` registers them: `current_time` and the reminders tools.
//! Only assembly: each tool is its own file; what turns tools off (`TOOLS`) is the
//! registry's caller's.

use std::sync::Arc;

use chrono_tz::Tz;
use sqlx::SqlitePool;

use super::current_time::CurrentTime;
use super::reminders::SchedulerSlot;
use super::Tool;

/// Every built-in tool: `current_time`, `reminders_create`, `reminders_list`,
/// `reminders_cancel`. `timezone` is the user's (`TIMEZONE`, else the system's); `cron` the
/// scheduler that reminders are jobs of (a running `CronHandle`, or a `SchedulerSlot` filled
/// once it runs); `pool` the database (the reminders tools read WhatsApp's last-inbound times
/// from it for the 24-hour window).
pub fn builtin_tools(
    timezone: Tz,
    cron: impl Into<SchedulerSlot>,
    pool: SqlitePool,
) -> Vec<Arc<dyn Tool>> {
    let mut tools: Vec<Arc<dyn Tool>> = vec![Arc::new(CurrentTime::new(timezone))];
    tools.extend(super::reminders::tools(cron, pool, timezone));
    tools
}
