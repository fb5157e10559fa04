"""Example: poll GitHub's most-starred repositories with an aioqueue cron job, serve them over
HTTP. See README.md in this directory."""
