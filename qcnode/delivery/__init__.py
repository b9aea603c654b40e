"""Stage 5, delivery: the outbox and the senders (C-STORE SCU)."""
