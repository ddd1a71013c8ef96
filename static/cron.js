// Placeholder: the schedules panel (static/cron.js) is written with the cron feature.
