"""What the job does after the baseline (``config.mode``): ``compress``
(:mod:`.compress` with its stages :mod:`.dkm_stage`, :mod:`.qat_stage`),
``sensitivity`` / ``compare`` (:mod:`.studies`), ``equal_bytes``
(:mod:`.equal_bytes`) and ``survey`` (:mod:`.survey`). A new mode is a module
here with a ``mode(ctx, state, results) -> results`` function, named in
:data:`gkq_jax.job.run.MODES`."""
