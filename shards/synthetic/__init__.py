"""The synthetic captioned world: the embedded default corpus (``sga world``)."""
