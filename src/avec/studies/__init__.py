"""End-to-end experiments built on the core, each with its report: method comparison
(:mod:`~avec.studies.compare`), refusal with its fine-tuned refuser (:mod:`~avec.studies.refusal`)
and the maze policy (:mod:`~avec.studies.maze`)."""
