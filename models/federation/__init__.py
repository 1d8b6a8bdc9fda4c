"""What every model family shares: the family interface, client sampling and per-client
randomness, evaluation summaries, and the reference round loop that runs any family."""
