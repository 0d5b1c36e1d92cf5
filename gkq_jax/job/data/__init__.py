"""The job's data: image datasets in memory (:mod:`.images`) or streamed
through grain (:mod:`.streaming`), and their augmentation (:mod:`.augment`)."""
