"""Example: a workflow that renders a report with progress, emails it to every recipient
(a group) and records who got it (a fan-in callback). See README.md in this directory."""
