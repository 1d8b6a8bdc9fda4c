"""fedrec: the command line and process-level setup around the core (``models``) and the flows."""
