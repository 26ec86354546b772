"""Generation queue: jobs go to workers, events (token deltas, done, error) come back."""
