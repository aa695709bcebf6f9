"""What a run publishes and reads back: summary, report.html, runs and their changes, charts,
terminal output (no torch, no model)."""
