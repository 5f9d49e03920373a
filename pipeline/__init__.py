"""The Ray labeling job: captions + regions -> label shards + manifest (``sga label``)."""
