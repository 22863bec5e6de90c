"""``srpo eval``: render checkpoints on one prompt set and seeds, score them with several rewards,
and write the paper-style table (:mod:`.stats` for the numbers, :mod:`.outputs` for the files)."""
