"""Stage 3, scoring: the worker that scores a stable series and stores its result."""
