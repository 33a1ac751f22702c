"""`kdpipe demo`: the whole pipeline on the Python standard library's own source, in minutes."""
