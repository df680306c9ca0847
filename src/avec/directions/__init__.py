"""From contrast data to a direction: read activations (:mod:`~avec.directions.activations`),
fit a method (:mod:`~avec.directions.methods`), and build a steering vector
(:mod:`~avec.directions.extract`)."""
