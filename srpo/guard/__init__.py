"""The guard: watches a run for reward hacking and over-optimisation while it trains (drift of
image statistics against the base model, held-out judges, diversity), stops it by rules, keeps
the best checkpoint and writes a report page. ``stats`` holds the pure statistics, ``rules`` the
stop / best rules, ``monitor`` the evaluation the trainer calls, ``report`` the page."""
