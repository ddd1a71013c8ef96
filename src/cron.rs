//! Scheduled jobs that make the assistant write first.
