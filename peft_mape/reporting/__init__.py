"""Reports about a finished erasure: the audit report, selection summaries, plots."""
