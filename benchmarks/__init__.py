"""Quality, speed and scale measurements; each prints a table and writes JSON to ``results/``."""
