"""Stage 2, tracking: series stability and the scoring-job rounds."""
