"""Real cross-silo federation, the pure part: signed messages between the coordinator and the
sites, the sites registry, the site's replay record, what a received state or update may
contain, and the item catalogue agreed from the sites' item sets. No I/O beyond local files,
no Prefect, no MLflow: the transport lives in ``fedrec/sites``."""
