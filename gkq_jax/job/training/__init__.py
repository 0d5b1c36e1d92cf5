"""Training and measuring: the train / eval steps, checkpointed fitting
(:mod:`.train`), latency and MAC counts (:mod:`.measure`), energy estimates
(:mod:`.energy`)."""
