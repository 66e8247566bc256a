"""What every stage runs on: cancellation, the one worker pool, the one backoff and retry loop, the
rate limits, and the early-start status file. Knows no store and no checkpoint."""
