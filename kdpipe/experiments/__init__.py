"""`kdpipe experiment` and `kdpipe report`: arms × seeds over one cache, with intervals."""
