"""Real cross-silo federation, the transport and the processes: a site's process next to its
data (:mod:`fedrec.sites.process`), HTTP to the Prefect API and the MLflow artifact proxy
(:mod:`fedrec.sites.transport`), and the ``fedrec site`` / ``fedrec keygen`` commands."""
